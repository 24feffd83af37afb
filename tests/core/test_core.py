"""EngineCore in one process: steering logits against a plain HF forward hook, and the same scenario as the
multiprocess pipeline giving the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import PROMPTS, core_request, tiny_config
from engine import Engine
from engine.core.engine_core import EngineCore
from engine.core.scheduler import Scheduler
from engine.messages import CoreRequest, FinishedSeq
from engine.pipeline.request import RecordError
from support.reference import hf_greedy, steered


@pytest.fixture(scope="module")
def core(tiny_source):
    return EngineCore(tiny_config(), tiny_source)


@pytest.fixture(scope="module")
def vector(tmp_path_factory, core):
    path = tmp_path_factory.mktemp("vec") / "v.npy"
    np.save(path, np.random.default_rng(0).standard_normal(core.steering.hidden_size).astype(np.float32) * 2)
    return str(path)


def request(i: int, steering=None, **kw) -> CoreRequest:
    return core_request(i, steering, **kw)


def first_step_logits(core, tokenizer, specs: list, prompts: list | None = None) -> torch.Tensor:
    """Prefill logits of a mixed-length batch, one spec per row (None = unsteered)."""
    for i, spec in enumerate(specs):
        core.add(request(i, spec), torch.tensor(prompts[i] if prompts else tokenizer(PROMPTS[i]).input_ids))
    batch = core.scheduler.schedule()
    assert batch.is_prefill and len(batch.seqs) == len(specs)
    logits = core.runner.prefill_logits(batch.seqs)
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)  # drop them again
    return logits


def hf_last_logits(model, ids: list[int], spec) -> torch.Tensor:
    with steered(model, spec), torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_first_step_logits_equal_a_plain_forward_hook(core, tokenizer, tiny_model, vector, positions):
    spec = {"vector": vector, "layers": [1, 3], "coef": 3.0, "positions": positions}
    specs = [spec, None, spec, None]
    logits = first_step_logits(core, tokenizer, specs)
    unsteered = first_step_logits(core, tokenizer, [None] * 4)
    for i, row_spec in enumerate(specs):
        ids = tokenizer(PROMPTS[i]).input_ids
        expected = hf_last_logits(tiny_model, ids, row_spec if positions != "generated" else None)
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)
    # unsteered rows are bit-identical to a batch with no steering at all; generated leaves prompts alone
    assert torch.equal(logits[1], unsteered[1]) and torch.equal(logits[3], unsteered[3])
    assert torch.equal(logits[0], unsteered[0]) == (positions == "generated")


def test_in_process_core_and_pipeline_give_the_same_tokens(core, tokenizer, vector):
    spec = {"vector": vector, "layers": [2], "coef": 2.0, "positions": "generated"}
    rows = [request(i, spec if i % 3 == 0 else None, temperature=0.7 * (i % 2), top_k=20 * (i % 2))
            for i in range(len(PROMPTS))]
    done = core.generate(rows, [tokenizer(p).input_ids for p in PROMPTS])
    records = [{"prompt": p, "max_new_tokens": 6, "temperature": r.temperature, "top_k": r.top_k,
                "seed": r.seed, "steering": r.steering and r.steering.to_record()} for p, r in zip(PROMPTS, rows)]
    with Engine(tiny_config(max_num_seqs=3)) as engine:
        got = engine.generate_all(records)
    assert [r["completion_token_ids"] for r in got] == [done[i].output_ids for i in range(len(PROMPTS))]


def test_a_one_token_prompt_alone_is_padded_and_still_equals_hf(core, tokenizer, tiny_model, vector):
    # A prefill of one token in all is padded to two (a one-token row is a shape the compiled layers would compile
    # again for); the pad's K/V go to the trash column, so the sequence's own cache, logits and tokens are HF's.
    spec = {"vector": vector, "layers": [1], "coef": 2.0, "positions": "all"}
    for row_spec in (None, spec):
        logits = first_step_logits(core, tokenizer, [row_spec], prompts=[[17]])
        torch.testing.assert_close(logits[0], hf_last_logits(tiny_model, [17], row_spec), rtol=1e-4, atol=1e-4)
        done = core.generate([request(0, row_spec)], [[17]])
        assert done[0].output_ids == hf_greedy(tiny_model, [17], 6, row_spec)


def test_teacher_forced_logits_equal_hf_forward_at_every_position(core, tokenizer, tiny_model):
    from support.teacher_forcing import engine_logits, hf_logits

    gen = torch.Generator().manual_seed(3)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:4]]  # the fixture core has 4 KV rows
    sequences = [ids + torch.randint(5, 50_000, (4 + 3 * i,), generator=gen).tolist() for i, ids in enumerate(prompts)]
    got = engine_logits(core, sequences, [len(p) for p in prompts])
    for ids, prompt, logits in zip(sequences, prompts, got):
        expected = hf_logits(tiny_model, ids, len(prompt))
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_core_ends_a_sequence_soon_after_its_stop_string(core, tokenizer):
    from engine.pipeline.decoder_worker import finalize

    ids = tokenizer(PROMPTS[1]).input_ids
    full = core.generate([request(0, max_new_tokens=48)], [ids])[0].output_ids
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop = tokenizer.decode(full[12:14], skip_special_tokens=True).strip()
    assert stop and stop in text
    stopped = core.generate([request(1, max_new_tokens=48, stop=[stop])], [ids])[1]
    assert stopped.finish_reason == "stop" and len(stopped.output_ids) < 48  # the core stopped, not only the decoder
    assert stopped.output_ids == full[:len(stopped.output_ids)]
    finished = FinishedSeq(1, np.asarray(stopped.output_ids, np.int32).tobytes(), "stop", len(ids), [stop])
    [result] = finalize(tokenizer, [finished], False)
    assert result.completion == text[:text.find(stop)] and result.finish_reason == "stop"


def test_decoder_texts_equal_hf_batch_decode(tokenizer):
    """The decoders' fast path (the Rust tokenizer's batch decode) gives HF's batch_decode texts, special and added
    tokens, byte pieces and whitespace included."""
    from engine.pipeline.decoder_worker import decode_texts

    rng = np.random.default_rng(0)
    id_lists = [rng.integers(0, len(tokenizer), 60).tolist() for _ in range(64)]
    id_lists += [tokenizer("Hello , world ! It's  a test.\n\n  x  ")["input_ids"], [], tokenizer.all_special_ids]
    assert decode_texts(tokenizer, id_lists) == tokenizer.batch_decode(id_lists, skip_special_tokens=True)


def test_cancelled_requests_leave_at_once_and_the_rest_run_as_without_them(core, tokenizer):
    """Core has 4 KV rows: 0-3 run, 4-6 wait. Cancel a running one, a waiting one and one not arrived yet (refused
    when it comes); the others' tokens equal a run without any of them, and the freed row serves the queue."""
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:7]]
    rows = [request(i, max_new_tokens=12) for i in range(7)]
    alone = core.generate([r for r in rows if r.index not in (1, 5)], [p for i, p in enumerate(prompts)
                                                                       if i not in (1, 5)])
    for r, ids in zip(rows, prompts):
        core.add(r, torch.tensor(ids))
    done = {}
    for _ in range(3):
        done.update((s.index, s) for s in core.step())
    assert sorted(core.cancel([1, 5, 99])) == [1, 5]
    with pytest.raises(RecordError, match="cancelled"):
        core.add(request(99), torch.tensor(prompts[0]))
    while core.has_work:
        done.update((s.index, s) for s in core.step())
    assert sorted(done) == [0, 2, 3, 4, 6]
    assert {i: s.output_ids for i, s in done.items()} == {i: s.output_ids for i, s in alone.items()}
