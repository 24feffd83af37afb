"""ModelRunner: runs an unmodified Hugging Face causal LM over the KV cache (one KV row per sequence).

Prefill: the new sequences packed end to end in one row (not in a graph), K/V written into their KV rows, logits of
each prompt's last position only. Decode: one token for each of the first B KV rows from static device buffers,
packed in one row the same way; on CUDA the forward is captured in a CUDA graph per (B, attended length) bucket
and replayed. Both are [1, tokens] rows of at least two tokens, so the compiled layers (CUDA) have one graph.
Every forward also checks, at the positions whose logits it keeps, that the final norm did not collapse
(CollapseCheck).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core import attention
from engine.core.activations import ActivationRecorder
from engine.core.attention import CONTEXT, decode_masks
from engine.core.decode_graphs import DecodeGraphs, DecodeInputs
from engine.core.faults import CollapseCheck
from engine.core.kv_cache import KVCache
from engine.core.lora import LoraTable
from engine.core.sampler import Sampler, SamplingMetadata
from engine.core.scheduler import ScheduledBatch, Sequence, bucket
from engine.core.steering import SteeringTable
from engine.core.trace import Phases
from engine.core.transfer import to_device
from engine.core.warmup import compile_layers, placeholder, warm_compiled, warm_sampler

MIN_READ_LEN = 128


class ModelRunner:
    """Prefill and decode steps; returns sampled next tokens on the device (NON_FINITE for rows whose logits
    overflowed or whose final norm collapsed, see engine.core.sampler)."""

    def __init__(self, model, steering: SteeringTable, cache: KVCache, use_graphs: bool,
                 recorder: ActivationRecorder, max_prefill_tokens: int, phases: Phases | None = None,
                 compile_cache=None, lora: LoraTable | None = None):
        self.model, self.steering, self.cache = model, steering, cache
        self.recorder = recorder
        self.logprobs: tuple | None = None  # the last step's chosen_logprobs
        self.lora = lora if lora is not None else LoraTable(model, {}, next(model.parameters()).device, cache.num_rows)
        self.device = next(model.parameters()).device
        self.windows = _use_engine_attention(model)
        kv_rows = cache.num_rows
        # Decode attends over a power-of-two bucket of columns >= every row's length (static for graphs).
        self.read_lens = sorted({min(MIN_READ_LEN << i, cache.max_len)
                                 for i in range((cache.max_len // MIN_READ_LEN).bit_length() + 1)})
        self.inputs = DecodeInputs(kv_rows, self.device)  # static decode inputs, indexed by KV row
        self.collapse = CollapseCheck(model, kv_rows, self.device)  # a prefill has at most one prompt per KV row
        self.sampler = Sampler(self.collapse.is_norm_ok)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        phases = phases or Phases()
        phases.done("setup")
        if compile_cache is not None:  # an open engine.core.compile_cache.CompileCache
            attention.bind_cache(model, cache)
            compile_layers(model)
            warm_compiled(self, max_prefill_tokens, compile_cache)
            phases.done("compile")
        self.graphs = DecodeGraphs(self._decode_forward, steering, self.inputs.meta, cache, self.use_graphs)
        if self.use_graphs:  # the largest unsteered bucket now: its pool memory is then there for every later graph
            self.graphs.capture((cache.num_rows, self.read_lens[-1], None, False, False))
        phases.done("capture")
        warm_sampler(self)
        phases.done("sampler")

    @property
    def graph_stats(self) -> dict:
        """Decode graphs captured, re-captured, and the seconds spent (DecodeGraphs.stats)."""
        return self.graphs.stats

    @property
    def tokens(self) -> torch.Tensor:
        """Each KV row's next decode input token (DecodeInputs.tokens)."""
        return self.inputs.tokens

    # ---- prefill
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        logits = self.prefill_logits(seqs)
        params = SamplingMetadata.build([s.sampling_row for s in seqs], self.device)
        steps = torch.zeros(len(seqs), dtype=torch.int64, device=self.device)
        tokens = self.sampler(logits, params, steps)
        self.logprobs = chosen_logprobs(seqs, logits, tokens)
        kv_rows = to_device([s.row for s in seqs], torch.int64, self.device)
        self.inputs.tokens.index_copy_(0, kv_rows, _feedable(tokens))
        self.inputs.set_sampling(seqs, kv_rows)
        self.steering.assign(seqs)
        self.lora.assign(seqs, kv_rows)
        return tokens

    @torch.inference_mode()
    def prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [P, V] at each prompt's last token. The prompts run packed end to end in one row: no padding,
        so the forward's cost is the real tokens' (a left-padded batch pays for its longest prompt in every row)."""
        num_prompts = len(seqs)
        if num_prompts == 1 and seqs[0].num_prompt_tokens == 1:  # a one-token row: padded (the layers' one shape)
            seqs = [*seqs, placeholder(1, seqs[0].row, self.device)]
        lengths = [s.num_prompt_tokens for s in seqs]
        starts = np.cumsum([0] + lengths)
        ids = torch.cat([s.prompt_ids for s in seqs])[None]
        host = np.empty((4, int(starts[-1])), dtype=np.int64)  # position, cache column, KV row, index of its prompt
        for i, (seq, start, n) in enumerate(zip(seqs, starts, lengths)):
            host[0, start:start + n] = host[1, start:start + n] = np.arange(n)
            host[2, start:start + n] = seq.row
            host[3, start:start + n] = i
        host[1, int(starts[num_prompts]):] = self.cache.trash  # the pad's K/V: nothing reads it
        positions, columns, kv_rows, owner = to_device(torch.from_numpy(host), torch.int64, self.device)
        CONTEXT.cache, CONTEXT.is_prefill = self.cache, True
        CONTEXT.rows, CONTEXT.write_pos = kv_rows, columns
        CONTEXT.spans = list(zip(starts[:-1].tolist(), lengths))
        CONTEXT.cu_lens, CONTEXT.prompt_of = to_device(starts, torch.int32, self.device), owner
        self.steering.set_active(self.steering.prefill_inputs(seqs, starts))
        self.lora.set_active(self.lora.prefill_select(seqs, starts))
        self.recorder.start_prefill(seqs, starts, owner)
        last = to_device(starts[1:] - 1, torch.int64, self.device)
        scored = [i for i, s in enumerate(seqs[:num_prompts]) if s.num_prompt_logprobs >= 0]
        keep = last if not scored else to_device(_kept(starts, lengths, set(scored)), torch.int64, self.device)
        self.collapse.watch(last)
        try:
            out = self.model(input_ids=ids, position_ids=positions[None], use_cache=False, logits_to_keep=keep)
        finally:
            self.steering.set_active({})
            self.lora.set_active(None)
            self.recorder.stop()
            self.collapse.stop()
        if not scored:
            return out.logits[0, :num_prompts]
        return _score_prompts(seqs, scored, lengths, out.logits[0])[:num_prompts]

    # ---- decode
    @torch.inference_mode()
    def decode(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = batch.num_rows
        logits = self.decode_logits(batch)
        params = self.inputs.sampling(batch.seqs, rows)
        tokens = self.sampler(logits, params, self.inputs.meta[2, :rows])
        self.logprobs = chosen_logprobs(batch.seqs, logits, tokens)
        self.inputs.tokens[:rows] = _feedable(tokens)
        return tokens

    def decode_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = batch.num_rows
        read_len = bucket(max(s.num_tokens for s in batch.seqs), self.read_lens)
        key = (rows, read_len, self.steering.graph_key(any(s.steering is not None for s in batch.seqs)),
               self.recorder.graph_key(batch), self.lora.uses(batch.seqs))
        if key not in self.graphs:
            self.graphs.capture(key)  # before this step's inputs are set: a capture's forwards overwrite them
        self.inputs.stage(batch, self.cache.trash)
        self.steering.advance()  # generated-range steering that starts or ends at this step
        if not self.use_graphs:
            return self._decode_forward(key, is_graph=False)
        return self.graphs.replay(key)

    def _decode_forward(self, key: tuple, is_graph: bool) -> torch.Tensor:
        rows, read_len, steer_key, is_capturing, is_lora = key
        inputs = self.inputs
        positions = inputs.meta[0, :rows]
        CONTEXT.cache, CONTEXT.is_prefill, CONTEXT.rows = self.cache, False, inputs.row_ids[:rows]
        CONTEXT.write_pos, CONTEXT.read_len, CONTEXT.positions = inputs.meta[1, :rows], read_len, positions
        CONTEXT.masks = decode_masks(positions, read_len, self.windows)
        self.steering.set_active(self.steering.decode_inputs(rows, steer_key is not None, is_graph))
        self.lora.set_active(self.lora.decode_select(rows, is_lora))
        self.recorder.start_decode(rows, is_capturing, is_graph)
        self.collapse.watch(None)
        try:
            out = self.model(input_ids=inputs.tokens[None, :rows], position_ids=positions[None], use_cache=False,
                             logits_to_keep=0)  # the rows' tokens packed in one row, as a prefill's: all kept
        finally:
            self.steering.set_active({})
            self.lora.set_active(None)
            self.recorder.stop()
            self.collapse.stop()
        # In the model's dtype: the greedy argmax and the fused sampler read it as is (casting 512 x 256k logits to
        # float32 inside the graph cost a write and a re-read of 0.5 GB a step); the sampler casts where it must.
        return out.logits[0]

    def step(self, batch: ScheduledBatch) -> torch.Tensor:
        return self.prefill(batch.seqs) if batch.is_prefill else self.decode(batch)


def _use_engine_attention(model) -> set:
    """Make the model's attention the engine's (engine.core.attention); the sliding windows its layers attend over,
    with None for full attention."""
    attention.register()
    model.config._attn_implementation = attention.NAME
    text = model.config.get_text_config()
    text._attn_implementation = attention.NAME
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    # With layer_types (Gemma 2/3, Qwen2/3) the window holds only where a layer is "sliding_attention"; without
    # them (Mistral, Mixtral, Phi-3, Qwen3-MoE) every layer passes config.sliding_window to the attention when set.
    is_sliding = "sliding_attention" in layer_types if layer_types else window is not None
    return ({window} if is_sliding and window else set()) | {None}


def chosen_logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> tuple | None:
    """When a sequence of the step asks for log-probabilities: (the sampled tokens' [B], the top-k values [B, k] and
    ids [B, k], k the most any asks for; None for k = 0), under the model's own distribution (its logits before
    temperature, top-k and top-p, as OpenAI and vLLM report them), in float32; else None. Rows as the logits'."""
    k = max(s.num_logprobs for s in seqs)
    if k < 0:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, _feedable(tokens)[:, None])[:, 0]
    if not k:
        return chosen, None, None
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return chosen, top.values, top.indices.to(torch.int32)


def _kept(starts, lengths: list[int], scored: set[int]) -> np.ndarray:
    """The packed positions whose logits a prefill keeps: every position of a prompt whose log-probabilities were
    asked for, the last of every other one, prompt by prompt."""
    return np.concatenate([np.arange(start, start + n) if i in scored else np.array([start + n - 1])
                           for i, (start, n) in enumerate(zip(starts[:-1], lengths))])


def _score_prompts(seqs: list[Sequence], scored: list[int], lengths: list[int], logits: torch.Tensor) -> torch.Tensor:
    """From a prefill's kept logits (_kept's), each scored prompt's log-probabilities of its own tokens after the
    first (position t's logits predict token t + 1) and their top-k alternatives, left on the sequence as device
    tensors (read once it finishes); the last position's logits of every prompt, for sampling."""
    at, last = 0, []
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        if i not in scored:
            last.append(at)
            at += 1
            continue
        rows = torch.log_softmax(logits[at:at + n - 1].float(), dim=-1)
        chosen = rows.gather(-1, seq.prompt_ids[1:, None])[:, 0]
        k = min(seq.num_prompt_logprobs, rows.shape[-1])
        top = rows.topk(k, dim=-1) if k else None
        seq.prompt_scores = (chosen, None if top is None else top.values, None if top is None else top.indices)
        last.append(at + n - 1)
        at += n
    return logits[torch.tensor(last, device=logits.device)]


def _feedable(tokens: torch.Tensor) -> torch.Tensor:
    """Sampled tokens as the next decode embeds them: NON_FINITE (-1) becomes token 0. The host ends that sequence
    when it reads the -1, but the step launched meanwhile still embeds its KV row's token, and an id outside the
    vocabulary there is an out-of-bounds gather (on CUDA a device-side assert that kills the whole core)."""
    return tokens.clamp_min(0)
