"""ModelRunner: runs an unmodified Hugging Face causal LM over the KV cache (one KV row per sequence).

Prefill: the new sequences packed end to end in one row (not in a graph), K/V written into their KV rows, logits of
each prompt's last position only. Decode: one token for each of the first B KV rows from static device buffers,
packed in one row the same way; on CUDA the forward is captured in a CUDA graph per (B, attended length) bucket
and replayed. Both are [1, tokens] rows of at least two tokens, so the compiled layers (CUDA) have one graph.
Every forward also checks, at the positions whose logits it keeps, that the final norm did not collapse
(CollapseCheck).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np
import torch

from engine.core import attention
from engine.core.activations import ActivationRecorder
from engine.core.attention import CONTEXT, decode_masks
from engine.core.kv_cache import KVCache
from engine.core.sampler import Sampler, SamplingMetadata
from engine.core.scheduler import ScheduledBatch, Sequence, bucket
from engine.models import decoder_layers
from engine.core.steering import SteeringTable
from engine.core.trace import Phases
from engine.core.transfer import to_device

log = logging.getLogger("engine")

MIN_READ_LEN = 128


class ModelRunner:
    """Prefill and decode steps; returns sampled next tokens on the device (NON_FINITE for rows whose logits
    overflowed or whose final norm collapsed, see engine.core.sampler)."""

    def __init__(self, model, steering: SteeringTable, cache: KVCache, use_graphs: bool,
                 recorder: ActivationRecorder, max_prefill_tokens: int, phases: Phases | None = None,
                 compile_cache=None):
        self.model, self.steering, self.cache = model, steering, cache
        self.recorder = recorder
        self.device = next(model.parameters()).device
        attention.register()
        model.config._attn_implementation = attention.NAME
        text = model.config.get_text_config()
        text._attn_implementation = attention.NAME
        layer_types = getattr(text, "layer_types", None) or []
        windows = {getattr(text, "sliding_window", None)} if "sliding_attention" in layer_types else set()
        self.windows = windows | {None}
        kv_rows = cache.num_rows
        # Decode attends over a power-of-two bucket of columns >= every row's length (static for graphs).
        self.read_lens = sorted({min(MIN_READ_LEN << i, cache.max_len)
                                 for i in range((cache.max_len // MIN_READ_LEN).bit_length() + 1)})
        # Static decode inputs, indexed by KV row.
        self.tokens = torch.zeros(kv_rows, dtype=torch.int64, device=self.device)
        self.meta = torch.zeros(3, kv_rows, dtype=torch.int64, device=self.device)  # position, write column, step
        self.row_ids = torch.arange(kv_rows, device=self.device)  # decode row b is KV row b (not an arange per layer)
        # Two pinned staging buffers, alternating: the host writes step N+1's while step N's copy may still be queued.
        self._meta_hosts = [torch.zeros(3, kv_rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
                            for _ in range(2)]
        self._meta_flip = 0
        self.temperature = torch.zeros(kv_rows, dtype=torch.float32, device=self.device)
        self.top_p = torch.ones(kv_rows, dtype=torch.float32, device=self.device)
        self.top_k = torch.zeros(kv_rows, dtype=torch.int64, device=self.device)
        self.seed = torch.zeros(kv_rows, dtype=torch.int64, device=self.device)
        self.collapse = CollapseCheck(model, kv_rows, self.device)  # a prefill has at most one prompt per KV row
        self.sampler = Sampler(self.collapse.is_norm_ok)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        phases = phases or Phases()
        phases.done("setup")
        if compile_cache is not None:  # an open engine.core.compile_cache.CompileCache
            attention.bind_cache(model, cache)
            compile_layers(model)
            self._warm_compiled(max_prefill_tokens, compile_cache)
            phases.done("compile")
        self._graphs: dict[tuple, _DecodeGraph] = {}  # GraphKey -> its graph, captured on first use
        self._stale: set[tuple] = set()  # keys whose graph was dropped because an input it read was reallocated
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # one memory pool for all graphs
        self._steering_version = steering.version
        self.graph_stats = {"captures": 0, "recaptures": 0, "capture_s": 0.0}
        if self.use_graphs:  # the largest unsteered bucket now: its pool memory is then there for every later graph
            self._capture((cache.num_rows, self.read_lens[-1], None, False))
        phases.done("capture")
        self._warm_sampler()
        phases.done("sampler")

    def _warm_sampler(self) -> None:
        """Compile the fused sampler kernel now, not in the middle of the first sampled step (~1-2 s)."""
        if self.device.type != "cuda":
            return
        vocab = self.model.config.get_text_config().vocab_size
        rows = [(1.0, 1.0, 0, 0)]
        self.sampler(torch.zeros(1, vocab, device=self.device), SamplingMetadata.build(rows, self.device),
                     torch.zeros(1, dtype=torch.int64, device=self.device))

    def _warm_compiled(self, max_prefill_tokens: int, compile_cache) -> None:
        """Compile now (from the persistent cache when it has this model), once more afresh if compiling with the
        cache's artefacts fails: a cache that passed its checks but still does not load costs a cold start-up."""
        try:
            self._warm_prefill(max_prefill_tokens)
        except Exception as exc:  # noqa: BLE001 - retried once without the cache; a second failure propagates
            if is_device_error(exc):
                raise
            log.warning("compiling the decoder layers failed (%s: %s)", type(exc).__name__, exc)
            compile_cache.discard()
            torch._dynamo.reset()
            self._warm_prefill(max_prefill_tokens)

    def _warm_prefill(self, max_prefill_tokens: int) -> None:
        """Compile the layers now, not in a run's first prefill: one full packed row. Prefill and decode both run
        [1, tokens, hidden] rows of at least two tokens (a one-token prefill is padded, decode buckets start at 2),
        so this one graph serves every step. The full row comes first because Inductor tunes a dynamic-shape kernel
        for the sizes it first sees: warmed on a 2-token row, the prefill's GELU x up kernel ran at half speed on
        7k-token rows (H100). Writes K/V only into KV rows no sequence owns yet."""
        per_seq = min(self.cache.max_len, max_prefill_tokens)
        count = min(self.cache.num_rows, -(-max_prefill_tokens // per_seq))
        self.prefill_logits([_placeholder(per_seq, row, self.device) for row in range(count)])

    # ---- prefill
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        logits = self.prefill_logits(seqs)
        params = SamplingMetadata.build([s.sampling_row for s in seqs], self.device)
        steps = torch.zeros(len(seqs), dtype=torch.int64, device=self.device)
        tokens = self.sampler(logits, params, steps)
        kv_rows = to_device([s.row for s in seqs], torch.int64, self.device)
        self.tokens.index_copy_(0, kv_rows, _feedable(tokens))
        self._set_sampling(seqs, kv_rows)
        self.steering.assign(seqs)
        return tokens

    @torch.inference_mode()
    def prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [P, V] at each prompt's last token. The prompts run packed end to end in one row: no padding,
        so the forward's cost is the real tokens' (a left-padded batch pays for its longest prompt in every row)."""
        num_prompts = len(seqs)
        if num_prompts == 1 and seqs[0].num_prompt_tokens == 1:  # a one-token row: padded (the layers' one shape)
            seqs = [*seqs, _placeholder(1, seqs[0].row, self.device)]
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
        CONTEXT.cu_lens = to_device(starts, torch.int32, self.device)
        self.steering.set_active(self.steering.prefill_inputs(seqs, starts))
        self.recorder.start_prefill(seqs, starts, owner)
        last = to_device(starts[1:] - 1, torch.int64, self.device)
        self.collapse.watch(last)
        try:
            out = self.model(input_ids=ids, position_ids=positions[None], use_cache=False, logits_to_keep=last)
        finally:
            self.steering.set_active({})
            self.recorder.stop()
            self.collapse.stop()
        return out.logits[0, :num_prompts]

    def _set_sampling(self, seqs: list[Sequence], kv_rows: torch.Tensor) -> None:
        rows = [s.sampling_row for s in seqs]
        for target, column, dtype in ((self.temperature, 0, torch.float32), (self.top_p, 1, torch.float32),
                                      (self.top_k, 2, torch.int64), (self.seed, 3, torch.int64)):
            target.index_copy_(0, kv_rows, to_device([r[column] for r in rows], dtype, self.device))

    # ---- decode
    @torch.inference_mode()
    def decode(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = batch.num_rows
        logits = self.decode_logits(batch)
        params = self._decode_params(batch.seqs, rows)
        tokens = self.sampler(logits, params, self.meta[2, :rows])
        self.tokens[:rows] = _feedable(tokens)
        return tokens

    def decode_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = batch.num_rows
        read_len = bucket(max(s.num_tokens for s in batch.seqs), self.read_lens)
        key = (rows, read_len, self.steering.graph_key(any(s.steering is not None for s in batch.seqs)),
               self.recorder.graph_key(batch))
        if key not in self._graphs:
            self._capture(key)  # before this step's inputs are set: a capture's forwards overwrite them
        staging = self._meta_hosts[self._meta_flip]
        self._meta_flip ^= 1
        meta = staging[:, :rows].numpy()
        meta[0], meta[1], meta[2] = 0, self.cache.trash, 0
        for seq in batch.seqs:  # the input token is the last one sampled, at position num_tokens - 1
            meta[0, seq.row] = meta[1, seq.row] = seq.num_tokens - 1
            meta[2, seq.row] = seq.num_scheduled
        self.meta[:, :rows].copy_(staging[:, :rows], non_blocking=True)
        self.steering.advance()  # generated-range steering that starts or ends at this step
        if not self.use_graphs:
            return self._decode_forward(key, is_graph=False)
        return self._graphs[key].replay_logits()

    def _decode_forward(self, key: tuple, is_graph: bool) -> torch.Tensor:
        rows, read_len, steer_key, is_capturing = key
        positions = self.meta[0, :rows]
        CONTEXT.cache, CONTEXT.is_prefill, CONTEXT.rows = self.cache, False, self.row_ids[:rows]
        CONTEXT.write_pos, CONTEXT.read_len, CONTEXT.positions = self.meta[1, :rows], read_len, positions
        CONTEXT.masks = decode_masks(positions, read_len, self.windows)
        self.steering.set_active(self.steering.decode_inputs(rows, steer_key is not None, is_graph))
        self.recorder.start_decode(rows, is_capturing, is_graph)
        self.collapse.watch(None)
        try:
            out = self.model(input_ids=self.tokens[None, :rows], position_ids=positions[None], use_cache=False,
                             logits_to_keep=0)  # the rows' tokens packed in one row, as a prefill's: all kept
        finally:
            self.steering.set_active({})
            self.recorder.stop()
            self.collapse.stop()
        # In the model's dtype: the greedy argmax and the fused sampler read it as is (casting 512 x 256k logits to
        # float32 inside the graph cost a write and a re-read of 0.5 GB a step); the sampler casts where it must.
        return out.logits[0]

    def _decode_params(self, seqs: list[Sequence], rows: int) -> SamplingMetadata:
        host = [s.sampling_row for s in seqs]
        flags = SamplingMetadata.flags(host)
        return SamplingMetadata(self.temperature[:rows], self.top_p[:rows], self.top_k[:rows], self.seed[:rows], *flags)

    # ---- CUDA graphs
    @torch.inference_mode()
    def _capture(self, key: tuple) -> None:
        """Capture the decode step of GraphKey `key` = (rows, read_len, steering.graph_key, recorder.graph_key), on
        first use: a run captures the buckets it reaches, each once (~tens of ms), instead of every bucket up front.
        A steering table that was reallocated since drops the steered graphs, which read the old one; capturing one
        of those keys again is a re-capture, counted in graph_stats (none happen unless the table outgrows its
        preallocated rows). Without graphs only the bookkeeping runs."""
        started = time.perf_counter()
        if self.steering.version != self._steering_version:
            self._drop_steered()
        base = (key[0], key[1], None if key[2] is None else key[2][1], key[3])  # the key without the table version
        is_again = base in self._stale
        if self.use_graphs:
            self.meta[1].fill_(self.cache.trash)  # the capture's forwards write K/V: into the trash column only
            self._graphs[key] = _DecodeGraph(partial(self._decode_forward, key, True), self._pool)
        else:  # eager (CPU): the same bookkeeping, so which variants a run needs and what it re-captures is counted
            self._graphs[key] = None
        self._stale.discard(base)
        elapsed = time.perf_counter() - started
        self.graph_stats["captures"] += 1
        self.graph_stats["recaptures"] += is_again
        self.graph_stats["capture_s"] += elapsed
        log.debug("captured the decode graph %s in %.0f ms%s", key, 1e3 * elapsed, " (again)" if is_again else "")

    def _drop_steered(self) -> None:
        for key in [k for k in self._graphs if k[2] is not None]:
            del self._graphs[key]
            self._stale.add((key[0], key[1], key[2][1], key[3]))
        self._steering_version = self.steering.version
        log.info("the steering table grew past its preallocated rows: steered decode graphs are captured again")

    def step(self, batch: ScheduledBatch) -> torch.Tensor:
        return self.prefill(batch.seqs) if batch.is_prefill else self.decode(batch)


def _placeholder(num_tokens: int, row: int, device) -> Sequence:
    """A prompt of token 0s that no request owns: the compile warm-up's rows, and the pad of a one-token prefill."""
    return Sequence(index=-1, prompt_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device), max_new_tokens=1,
                    temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=True, stop=[], row=row)


def _feedable(tokens: torch.Tensor) -> torch.Tensor:
    """Sampled tokens as the next decode embeds them: NON_FINITE (-1) becomes token 0. The host ends that sequence
    when it reads the -1, but the step launched meanwhile still embeds its KV row's token, and an id outside the
    vocabulary there is an out-of-bounds gather (on CUDA a device-side assert that kills the whole core)."""
    return tokens.clamp_min(0)


def is_device_error(exc: BaseException) -> bool:
    """Whether an exception may have left the device unusable: CUDA out of memory, a CUDA/accelerator error, or a
    RuntimeError whose text says so (older torch raises CUDA errors as plain RuntimeErrors). Host MemoryError is
    not one: a vector file whose header claims terabytes fails its own allocation and nothing else."""
    if isinstance(exc, _DEVICE_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _DEVICE_ERROR_TEXTS)


_DEVICE_ERRORS = tuple(kind for kind in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None),
                                         getattr(torch.cuda, "CudaError", None),
                                         getattr(torch.cuda, "DeferredCudaCallError", None)) if kind is not None)
_DEVICE_ERROR_TEXTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                       "device-side assert", "HIP error", "NCCL error")


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied to the last hidden state before the LM head (`model.model.norm`: Llama, Gemma, Qwen, Mistral,
    Phi3, OLMo2; `model.model.language_model.norm` in a multimodal wrapper), or None if the model has none there."""
    inner = getattr(model, "model", None)
    for owner in (inner, getattr(inner, "language_model", None)):
        norm = getattr(owner, "norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
    return None


class CollapseCheck:
    """Whether each kept position's final norm worked: a bool per row in a static device buffer (`is_norm_ok`, which
    the sampler reads), written by a forward pre-hook on the final norm while the runner watches a forward.

    An RMSNorm scales by rsqrt(mean(h.float() ** 2) + eps). A residual stream that is finite but huge (a steering
    coef of 1e38, say) overflows that mean to inf, rsqrt makes the scale 0, and the norm outputs exactly 0: every
    logit is 0, finite, so the logits check passes and every token would be token 0. The hook computes that same
    mean (a NaN or inf already in h fails it too) at the positions whose logits are kept only: a prefill's prompts'
    last tokens (gathered first, so the cost is prompts x hidden), a decode's rows. It writes the buffer in place and
    never syncs the host, so it is captured inside the decode CUDA graphs with the rest of the forward; every watched
    forward overwrites the rows the sampler then reads, so warm-up and capture forwards leave nothing that matters."""

    def __init__(self, model, max_rows: int, device):
        norm = final_norm(model)
        self.is_norm_ok = None if norm is None else torch.ones(max_rows, dtype=torch.bool, device=device)
        self._kept: torch.Tensor | None = None  # prefill: the kept positions of the packed row; None: every row's
        self._is_watching = False  # only the runner's forwards are checked (and their shapes known)
        if norm is None:
            log.info("%s has no final norm at model.model.norm: collapsed forwards (a residual stream too large for "
                     "its norms' float range, which makes every logit 0) are not detected", type(model).__name__)
        else:
            norm.register_forward_pre_hook(self._check, with_kwargs=True)

    def watch(self, kept: torch.Tensor | None) -> None:
        """Check the next forward, at `kept` positions of a packed prefill row, or (None) at every decode row."""
        self._kept, self._is_watching = kept, True

    def stop(self) -> None:
        self._kept, self._is_watching = None, False

    def _check(self, module, args, kwargs) -> None:
        """Write is_norm_ok for the watched forward's kept positions (a pre-hook: changes nothing it is given)."""
        if not self._is_watching:
            return
        hidden = args[0] if args else next(iter(kwargs.values()))  # HF passes it positionally; a kwarg works too
        kept = hidden[0].index_select(0, self._kept) if self._kept is not None else hidden[0]
        self.is_norm_ok[:kept.shape[0]].copy_(kept.float().pow(2).mean(-1).isfinite())


def compile_layers(model) -> None:
    """Run each decoder layer's forward through torch.compile, which fuses its elementwise work (norms, rotary,
    activation, residual adds: ~30 small kernels a layer, 2.2 ms of a 5.5 ms decode step at batch 256 on an
    H200) into a few kernels; prefill too, where they are memory-bound passes over [tokens, 16k] tensors. The
    attention call stays eager (engine_attention is excluded) and forward hooks (steering, capture) stay outside."""
    # Variants: one row (prefill, packed) or several (decode), one token or more, per layer type; the default
    # limit of 8 would silently leave some layers eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Python floats (the attention scale, norm epsilons) as constants, as the model has them: traced as dynamic
    # inputs, one of them reached the attention op as a float and dynamo traced the first variant twice.
    torch._dynamo.config.specialize_float = True
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True)


class _DecodeGraph:
    """One captured decode forward; inputs are the runner's static buffers, the output a static tensor."""

    def __init__(self, forward, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm-up: lazy initialisation (a new shape's kernels, workspaces) must not happen during capture
            for _ in range(1):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = forward()

    def replay_logits(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits
