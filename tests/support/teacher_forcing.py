"""Teacher-forced logits from the engine's runner and from a plain HF forward, for the same sequences."""

from __future__ import annotations

import torch

from engine.core.engine_core import EngineCore
from engine.core.scheduler import Scheduler
from support import core_request


def engine_logits(core: EngineCore, sequences: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """For each sequence: the logits the engine computes at its last prompt position (prefill) and at every
    later position, feeding the sequence's own next token at each decode step (teacher forcing)."""
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)
    for i, (ids, n) in enumerate(zip(sequences, prompt_lens)):
        core.add(core_request(i, max_new_tokens=len(ids) - n + 1, seed=0), torch.tensor(ids[:n], device=core.device))
    batch = core.scheduler.schedule()
    assert batch.is_prefill and len(batch.seqs) == len(sequences)
    out = [[row] for row in core.runner.prefill_logits(batch.seqs).float()]
    core.steering.assign(batch.seqs)  # what prefill() does: these KV rows' decode-time steering (none)
    for step in range(max(len(ids) - n for ids, n in zip(sequences, prompt_lens))):
        live = [s for s, ids, n in zip(batch.seqs, sequences, prompt_lens) if n + step < len(ids)]
        for seq in live:
            seq.num_scheduled = step + 1
            core.runner.tokens[seq.row] = sequences[seq.index][prompt_lens[seq.index] + step]
        rows = max(s.row for s in live) + 1
        decode = core.scheduler.schedule()
        decode.seqs, decode.num_rows = live, next(b for b in core.scheduler.batch_sizes if b >= rows)
        logits = core.runner.decode_logits(decode).float().clone()  # a graph's output is overwritten by the next replay
        for seq in live:
            out[seq.index].append(logits[seq.row])
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)
    return [torch.stack(rows) for rows in out]


def hf_logits(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """HF forward over the whole sequence: logits at positions prompt_len - 1 .. len - 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0].float()
    return logits[prompt_len - 1:]


FORCED_SEED0 = 1000  # request i runs with seed 1000 + i: the teacher finds a sampled row's request by its seed


class _Teacher:
    """Stands in for the sampler: returns each request's own next token and keeps the logits it was given.

    A row's request is its seed and its generated position the step; decode rows outside the batch have step 0,
    whose logits the prefill already gave, so they are skipped."""

    def __init__(self, sequences: list[list[int]], prompt_lens: list[int]):
        self.sequences, self.prompt_lens, self.logits = sequences, prompt_lens, {}

    def __call__(self, logits, params, steps) -> torch.Tensor:
        tokens = torch.zeros(logits.shape[0], dtype=torch.int64)
        for row, (seed, step) in enumerate(zip(params.seed.tolist(), steps.tolist())):
            index = seed - FORCED_SEED0
            if 0 <= index < len(self.sequences) and (index, step) not in self.logits:
                self.logits[index, step] = logits[row].float().cpu()
                tokens[row] = self.sequences[index][self.prompt_lens[index] + step]
        return tokens.to(logits.device)


def forced_logits(core: EngineCore, sequences: list[list[int]], prompt_lens: list[int], specs: list
                  ) -> list[torch.Tensor]:
    """Teacher forcing through the real step loop (continuous batching, KV rows refilled), request i steered by
    specs[i]: for each sequence, the logits at positions prompt_len - 1 .. len - 2."""
    teacher, sampler = _Teacher(sequences, prompt_lens), core.runner.sampler
    core.runner.sampler = teacher
    try:
        core.generate([core_request(i, spec, max_new_tokens=len(ids) - n, seed=FORCED_SEED0 + i)
                       for i, (ids, n, spec) in enumerate(zip(sequences, prompt_lens, specs))],
                      [ids[:n] for ids, n in zip(sequences, prompt_lens)])
    finally:
        core.runner.sampler = sampler
    return [torch.stack([teacher.logits[i, step] for step in range(len(ids) - n)])
            for i, (ids, n) in enumerate(zip(sequences, prompt_lens))]


def forced_case(core, tokenizer) -> tuple:
    """The core (4 KV rows), the 10 sequences every run teacher-forces (mixed prompt and generated lengths, so KV rows
    refill), and their logits with no steering at all, taken before any hook exists."""
    from support import PROMPTS

    gen = torch.Generator().manual_seed(5)
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(10)]
    sequences = [ids + torch.randint(5, 50_000, (3 + 5 * i % 9,), generator=gen).tolist()
                 for i, ids in enumerate(prompts)]
    lens = [len(p) for p in prompts]
    return core, sequences, lens, forced_logits(core, sequences, lens, [None] * len(sequences))
