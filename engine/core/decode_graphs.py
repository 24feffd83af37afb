"""What a decode step reads and replays: its static device inputs, indexed by KV row (DecodeInputs), and its CUDA
graphs, one per GraphKey (rows, read_len, steering.graph_key, recorder.graph_key, whether it runs LoRA), captured on
first use (DecodeGraphs). A graph reads the inputs' tensors as they were at capture, so they are written in place,
never reallocated."""

from __future__ import annotations

import logging
import time
from functools import partial

import torch

from engine.core.kv_cache import KVCache
from engine.core.sampler import SamplingMetadata
from engine.core.scheduler import ScheduledBatch, Sequence
from engine.core.steering import SteeringTable
from engine.core.transfer import to_device

log = logging.getLogger("engine")


class DecodeInputs:
    """The decode step's static device buffers, indexed by KV row: input tokens, (position, write column, step) and
    sampling parameters; a prefill seeds its sequences' rows, each decode step stages the rest from the host."""

    def __init__(self, kv_rows: int, device: torch.device):
        self.device = device
        self.tokens = torch.zeros(kv_rows, dtype=torch.int64, device=device)
        self.meta = torch.zeros(3, kv_rows, dtype=torch.int64, device=device)  # position, write column, step
        self.row_ids = torch.arange(kv_rows, device=device)  # decode row b is KV row b (not an arange per layer)
        # Two pinned staging buffers, alternating: the host writes step N+1's while step N's copy may still be queued.
        self._meta_hosts = [torch.zeros(3, kv_rows, dtype=torch.int64, pin_memory=device.type == "cuda")
                            for _ in range(2)]
        self._meta_flip = 0
        self.temperature = torch.zeros(kv_rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(kv_rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(kv_rows, dtype=torch.int64, device=device)
        self.seed = torch.zeros(kv_rows, dtype=torch.int64, device=device)

    def set_sampling(self, seqs: list[Sequence], kv_rows: torch.Tensor) -> None:
        """Write the sampling parameters of `seqs` into their KV rows."""
        rows = [s.sampling_row for s in seqs]
        for target, column, dtype in ((self.temperature, 0, torch.float32), (self.top_p, 1, torch.float32),
                                      (self.top_k, 2, torch.int64), (self.seed, 3, torch.int64)):
            target.index_copy_(0, kv_rows, to_device([r[column] for r in rows], dtype, self.device))

    def stage(self, batch: ScheduledBatch, trash: int) -> None:
        """Queue the copy of the decode batch's (position, write column, step) per row; rows no sequence of the batch
        holds write into the `trash` column."""
        rows = batch.num_rows
        staging = self._meta_hosts[self._meta_flip]
        self._meta_flip ^= 1
        meta = staging[:, :rows].numpy()
        meta[0], meta[1], meta[2] = 0, trash, 0
        for seq in batch.seqs:  # the input token is the last one sampled, at position num_tokens - 1
            meta[0, seq.row] = meta[1, seq.row] = seq.num_tokens - 1
            meta[2, seq.row] = seq.num_scheduled
        self.meta[:, :rows].copy_(staging[:, :rows], non_blocking=True)

    def sampling(self, seqs: list[Sequence], rows: int) -> SamplingMetadata:
        """The sampling parameters of the first `rows` KV rows (views of the static buffers)."""
        host = [s.sampling_row for s in seqs]
        flags = SamplingMetadata.flags(host)
        return SamplingMetadata(self.temperature[:rows], self.top_p[:rows], self.top_k[:rows], self.seed[:rows], *flags)


class DecodeGraphs:
    """The decode CUDA graphs by GraphKey: captured on first use into one memory pool, replayed, and the steered ones
    dropped when the steering table is reallocated; captures and re-captures are counted in `stats`."""

    def __init__(self, forward, steering: SteeringTable, meta: torch.Tensor, cache: KVCache, use_graphs: bool):
        self._forward = forward  # forward(key, is_graph) -> logits: the runner's decode forward
        self.steering, self._meta, self._cache, self.use_graphs = steering, meta, cache, use_graphs
        self.by_key: dict[tuple, _DecodeGraph] = {}  # GraphKey -> its graph, captured on first use
        self._stale: set[tuple] = set()  # keys whose graph was dropped because an input it read was reallocated
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None  # one memory pool for all graphs
        self._steering_version = steering.version
        self.stats = {"captures": 0, "recaptures": 0, "capture_s": 0.0}

    def __contains__(self, key: tuple) -> bool:
        return key in self.by_key

    def replay(self, key: tuple) -> torch.Tensor:
        """Replay the captured graph of `key`; its logits are a static tensor that the next replay overwrites."""
        return self.by_key[key].replay_logits()

    @torch.inference_mode()
    def capture(self, key: tuple) -> None:
        """Capture the decode step of GraphKey `key` = (rows, read_len, steering.graph_key, recorder.graph_key,
        is_lora), on first use: a run captures the buckets it reaches, each once (~tens of ms), instead of every
        bucket up front. A steering table that was reallocated since drops the steered graphs, which read the old
        one; capturing one of those keys again is a re-capture, counted in graph_stats (none happen unless the table
        outgrows its preallocated rows). Without graphs only the bookkeeping runs."""
        started = time.perf_counter()
        if self.steering.version != self._steering_version:
            self._drop_steered()
        base = (key[0], key[1], None if key[2] is None else key[2][1], *key[3:])  # the key without the table version
        is_again = base in self._stale
        if self.use_graphs:
            self._meta[1].fill_(self._cache.trash)  # the capture's forwards write K/V: into the trash column only
            self.by_key[key] = _DecodeGraph(partial(self._forward, key, True), self._pool)
        else:  # eager (CPU): the same bookkeeping, so which variants a run needs and what it re-captures is counted
            self.by_key[key] = None
        self._stale.discard(base)
        elapsed = time.perf_counter() - started
        self.stats["captures"] += 1
        self.stats["recaptures"] += is_again
        self.stats["capture_s"] += elapsed
        log.debug("captured the decode graph %s in %.0f ms%s", key, 1e3 * elapsed, " (again)" if is_again else "")

    def _drop_steered(self) -> None:
        for key in [k for k in self.by_key if k[2] is not None]:
            del self.by_key[key]
            self._stale.add((key[0], key[1], key[2][1], *key[3:]))
        self._steering_version = self.steering.version
        log.info("the steering table grew past its preallocated rows: steered decode graphs are captured again")


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
