"""Activations: the ActivationRecorder that captures hidden states inside the engine's own forwards, the
ActivationStore that writes them as safetensors shards beside the results, and `load` to read them back.

What is captured is the output of decoder layer L: the residual stream after layer L, the tensor Hugging Face
returns as hidden_states[L + 1] (for the last layer HF returns the final-normed state instead; the engine still
gives the layer's output). By default after steering at that layer; with is_before_steering, before it.
Positions, per request:
  last_prompt  [H]     the last prompt token
  mean_prompt  [H]     the mean over the prompt tokens
  all_prompt   [T, H]  every prompt token
  generated    [N-1, H] row k is the residual at generated token k's own position T + k: the decode forward that
                       *consumes* token k (and samples token k + 1), as a forward over prompt + completion gives
                       it, and as steering counts `generated` positions. The last of the N completion tokens is
                       never fed back, so it has no row; the residual that produced token 0 is last_prompt.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from engine.pipeline.activation_messages import trim_generated  # noqa: F401 - re-exported for existing importers
from engine.storage.files import DiskLow, require_free  # noqa: F401 - re-exported for existing importers
from engine.config import CaptureDefaults
from engine.storage.id_index import IdIndex
from engine.pipeline.request import RecordError
from engine.specs import CaptureSpec
from engine.models import decoder_layers
from engine.storage.files import commit_file, complete_records, write_atomic
from engine.core.transfer import to_device

MAX_SHARD_BYTES = 512 << 20
FLUSH_SECONDS = 30.0
INDEX_NAME = "index.jsonl"


@dataclass(slots=True)
class _Capture:
    """One request's capture settings and what has been read back to the host so far."""

    layers: list[int]
    positions: str
    columns: list[tuple[int, int]] = field(default_factory=list)  # generated: (layer, column of the decode buffer)
    prompt: dict[int, np.ndarray] = field(default_factory=dict)  # prompt modes: layer -> [H] or [T, H]
    rows: list[np.ndarray] = field(default_factory=list)  # generated: one [layers, H] per consumed token


class ActivationRecorder:
    """Forward hooks on every decoder layer, armed per forward for the layers requests capture: prefill reduces on
    the device into per-request tensors; decode writes every running KV row into a static [num_kv_rows, num_layers, H]
    buffer (read inside the CUDA graphs), whose captured layers the core copies to pinned host memory with the
    step's tokens, one step ahead.

    The hooks exist from the start and the decode buffer, made when a request first captures generated tokens, has
    a column for every layer; a CUDA graph of a capturing decode step writes them all. So a request capturing a
    layer no earlier one did needs no new hook and no re-capture (`graph_key` only says whether a step captures).
    """

    def __init__(self, model, steering, device, num_kv_rows: int, capture: CaptureDefaults):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.steering, self.device, self.num_kv_rows = steering, torch.device(device), num_kv_rows
        self.dtype_name = capture.dtype
        self.dtype = getattr(torch, capture.dtype)
        self.is_before_steering = capture.is_before_steering
        self.requests: dict[int, _Capture] = {}  # Sequence.index -> its capture
        self.generated_layers: list[int] = []  # layers captured at generated positions, first use first
        self.decode_buffer: torch.Tensor | None = None  # [num_kv_rows, num_layers, H], made on first need
        self._columns: torch.Tensor | None = None  # generated_layers on the device, for the copy to the host
        self._host: list[torch.Tensor] = []  # two pinned [num_kv_rows, len(generated_layers), H] copies, used in turn
        self._flip = 0
        self._active: dict[int, partial] = {}  # layer -> what the hook does in the running forward
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # the last prefill's (index, layer, device tensor)
        for index, layer in enumerate(self.layers):
            handle = layer.register_forward_hook(self._make_hook(index))
            if self.is_before_steering:  # ahead of the steering hooks (which the SteeringTable registered first)
                layer._forward_hooks.move_to_end(handle.id, last=False)

    # ---- requests
    def register(self, index: int, spec: CaptureSpec | None) -> None:
        """Capture for one request (its parsed `capture`; None: nothing); RecordError if a layer is out of range."""
        if spec is None:
            return
        bad = [layer for layer in spec.layers if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"capture layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        capture = _Capture(list(spec.layers), spec.positions)
        if capture.positions == "generated":
            capture.columns = [(layer, self._column(layer)) for layer in capture.layers]
        self.requests[index] = capture

    def pop(self, index: int) -> dict | None:
        """A finished request's activations as a message: {positions, dtype, is_before_steering,
        layers: {layer: [shape, raw bytes]}}; None if it captured nothing."""
        capture = self.requests.pop(index, None)
        if capture is None:
            return None
        arrays = capture.prompt
        if capture.positions == "generated":
            rows = np.stack(capture.rows, axis=1) if capture.rows else self._empty_rows(len(capture.layers))
            arrays = dict(zip(capture.layers, rows))
        return {"positions": capture.positions, "dtype": self.dtype_name, "is_before_steering": self.is_before_steering,
                "layers": {layer: [list(a.shape), a.tobytes()] for layer, a in arrays.items()}}

    def _empty_rows(self, num_layers: int) -> np.ndarray:
        return _numpy(torch.empty(num_layers, 0, self.hidden_size, dtype=self.dtype))

    # ---- hooks
    def _make_hook(self, layer: int):
        def hook(module, args, output):
            write = self._active.get(layer)
            if write is not None:  # transformers 5 decoder layers return a Tensor, older ones a tuple
                write(output[0] if isinstance(output, tuple) else output)

        return hook

    def _column(self, layer: int) -> int:
        """The column of `layer` in the host copy of a decode step (stable: layers are only appended)."""
        if self.decode_buffer is None:
            self.decode_buffer = torch.zeros(self.num_kv_rows, self.num_layers, self.hidden_size, dtype=self.dtype,
                                             device=self.device)
        if layer not in self.generated_layers:
            self.generated_layers.append(layer)
            self._columns = to_device(self.generated_layers, torch.int64, self.device)  # no host sync
            shape = (self.num_kv_rows, len(self.generated_layers), self.hidden_size)
            pin = self.device.type == "cuda"
            self._host = [torch.zeros(shape, dtype=self.dtype, pin_memory=pin) for _ in range(2)]
        return self.generated_layers.index(layer)

    def graph_key(self, batch) -> bool:
        """Whether a decode step captures (any of its sequences records generated tokens): part of its graph's key."""
        return any(self._generated(s.index) for s in batch.seqs)

    def stop(self) -> None:
        self._active = {}

    # ---- prefill: reduce on the device
    def start_prefill(self, seqs, starts, owner: torch.Tensor) -> None:
        """Arm the hooks for a packed prefill: sequence j's prompt is columns starts[j]:starts[j + 1] of the one
        row, and owner [N] holds each column's j."""
        self._pending = []
        by_layer: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        for j, seq in enumerate(seqs):
            capture = self.requests.get(seq.index)
            if capture is None or capture.positions == "generated":  # generated rows come from the decode steps
                continue
            for layer in capture.layers:
                by_layer[layer].append((j, seq.index, capture.positions))
        if not by_layer:
            return
        spans = (starts, owner, len(seqs))
        self._active = {layer: partial(self._reduce, layer, items, spans) for layer, items in by_layer.items()}

    def _reduce(self, layer: int, items: list, spans: tuple, hidden: torch.Tensor) -> None:
        starts, owner, num_seqs = spans
        tokens = hidden[0]
        last = [(j, index) for j, index, mode in items if mode == "last_prompt"]
        if last:
            self._keep(layer, last, tokens[to_device([starts[j + 1] - 1 for j, _ in last], torch.int64, self.device)])
        mean = [(j, index) for j, index, mode in items if mode == "mean_prompt"]
        if mean:  # every prompt's sum in one index_add, then the wanted ones
            sums = torch.zeros(num_seqs, tokens.shape[-1], dtype=torch.float32, device=tokens.device)
            sums.index_add_(0, owner, tokens.float())
            count = to_device([starts[j + 1] - starts[j] for j, _ in mean], torch.float32, self.device)
            self._keep(layer, mean, sums[self._rows(mean)] / count[:, None])
        for j, index, mode in items:
            if mode == "all_prompt":
                self._pending.append((index, layer, tokens[starts[j]:starts[j + 1]].to(self.dtype)))

    def _rows(self, items: list[tuple[int, int]]) -> torch.Tensor:
        return to_device([row for row, _ in items], torch.int64, self.device)

    def _keep(self, layer: int, items: list[tuple[int, int]], values: torch.Tensor) -> None:
        values = values.to(self.dtype)
        self._pending += [(index, layer, values[i]) for i, (_, index) in enumerate(items)]

    # ---- decode: static buffers, read inside the graphs
    def start_decode(self, num_rows: int, is_capturing: bool, is_graph: bool) -> None:
        """Arm the hooks to write the first num_rows KV rows into the decode buffer: in a captured graph every layer's
        column (see the class doc), else the captured layers' only; nothing for a step that captures nothing."""
        if not is_capturing:
            return
        layers = range(self.num_layers) if is_graph else self.generated_layers
        self._active = {layer: partial(self._write, num_rows, layer) for layer in layers}

    def _write(self, num_rows: int, layer: int, hidden: torch.Tensor) -> None:
        self.decode_buffer[:num_rows, layer].copy_(hidden[0])  # decode: the B tokens packed in one row

    # ---- to the host, one step ahead
    def stage(self, batch) -> tuple | None:
        """Start the copies of a launched step's captures into pinned host memory (no wait); None if none."""
        if batch.is_prefill:
            pending, self._pending = self._pending, []
            if not pending:
                return None
            flat = torch.cat([t.reshape(-1) for _, _, t in pending])
            host = torch.empty(flat.shape, dtype=self.dtype, pin_memory=flat.is_cuda)
            host.copy_(flat, non_blocking=True)
            return host, [(index, layer, tuple(t.shape)) for index, layer, t in pending]
        if not any(self._generated(s.index) for s in batch.seqs):
            return None
        host = self._host[self._flip][:batch.num_rows]
        self._flip ^= 1
        host.copy_(self.decode_buffer[:batch.num_rows].index_select(1, self._columns), non_blocking=True)
        return host, None

    def _generated(self, index: int) -> bool:
        capture = self.requests.get(index)
        return capture is not None and capture.positions == "generated"

    def collect(self, batch, staged: tuple | None) -> None:
        """After the step's copy is done: hand each live sequence its values (before its new token is appended)."""
        if staged is None:
            return
        host, shapes = staged
        values = _numpy(host)
        if shapes is not None:
            self._collect_prefill(values, shapes)
            return
        for seq in batch.seqs:  # a sequence that already ended (EOS read late) gets nothing, as it gets no token
            capture = self.requests.get(seq.index)
            if seq.finish_reason is None and capture is not None and capture.columns:
                capture.rows.append(values[seq.row, [column for _, column in capture.columns]])

    def _collect_prefill(self, flat: np.ndarray, shapes: list) -> None:
        offset = 0
        for index, layer, shape in shapes:
            size = math.prod(shape)
            value = flat[offset:offset + size].reshape(shape).copy()
            offset += size
            self.requests[index].prompt[layer] = value


def _numpy(host: torch.Tensor) -> np.ndarray:
    """A host tensor as numpy; bfloat16 (which numpy lacks) as its raw 16-bit words."""
    return (host.view(torch.int16) if host.dtype == torch.bfloat16 else host).numpy()


# ---- messages between processes
def tensors_of(message: dict) -> dict[int, torch.Tensor]:
    """A message's activations as CPU tensors {layer: tensor}."""
    dtype = getattr(torch, message["dtype"])
    return {int(layer): torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data
            else torch.empty(shape, dtype=dtype) for layer, (shape, data) in message["layers"].items()}


# ---- on disk
def activations_dir(output: Path) -> Path:
    """The shard folder of a results file: results.jsonl -> results.activations/ (one per output, so several
    outputs can share a folder)."""
    return output.with_name(output.stem + ".activations")


class ActivationStore:
    """Safetensors shards `<results stem>.activations/00000.safetensors` (keys `<id>/layer.<L>`) and
    `index.jsonl` (one line per request: id, shard, keys, positions, dtype, is_before_steering).

    Durability: a shard is written to `*.tmp`, fsynced and renamed, then its index lines are fsynced, and only
    then may the result lines that point at it be written (`flush` returns, the writer writes them). So a result
    line never points at a shard that is not on disk; a crash leaves at most a `*.tmp` (deleted on resume) and
    entries for ids without a result line (dropped from the index on resume; those ids run again into a new
    shard, and the orphaned tensors in the old one are never referenced).

    Disk: before a shard is written, the file system must have its size plus `min_free_bytes` free; else `flush`
    raises DiskLow having written nothing (the caller drops the shard with `discard`; its records run again on
    resume, once there is space).
    """

    def __init__(self, output: Path, max_shard_bytes: int = MAX_SHARD_BYTES, flush_seconds: float = FLUSH_SECONDS,
                 min_free_bytes: int = 0, done: IdIndex | None = None):
        """`done`: the output's ids with the shard each points at (pipeline.writer.scan_done_ids); needed when the
        activation folder exists (a resume), to keep only the index entries a result line points at."""
        self.output, self.folder = output, activations_dir(output)
        self.max_shard_bytes, self.flush_seconds, self.min_free_bytes = max_shard_bytes, flush_seconds, min_free_bytes
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: list[dict] = []
        self._bytes = 0
        self._since: float | None = None
        self._next = self._recover(done) if self.folder.is_dir() else 0

    def _recover(self, done: IdIndex | None) -> int:
        """Resume: delete partial shards, keep index entries that a result line points at; the next shard number.
        Streams the output and the index (memory does not grow with the records)."""
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()
        index = self.folder / INDEX_NAME
        if index.exists():
            if done is None:
                raise ValueError(f"{self.folder}: resuming an activation index needs the output's done ids")
            kept = (line for line in complete_records(index) if done.has_shard(line["id"], line["shard"]))
            write_atomic(index, ((json.dumps(line) + "\n").encode() for line in kept))
        numbers = [int(p.stem) for p in self.folder.glob("*.safetensors") if p.stem.isdigit()]
        return max(numbers, default=-1) + 1

    def add(self, record_id: str, message: dict, tensors: dict[int, torch.Tensor]) -> dict:
        """Buffer one request's tensors for the current shard; the pointer its result record carries."""
        shard = f"{self.folder.name}/{self._next:05d}.safetensors"
        keys = []
        for layer, tensor in sorted(tensors.items()):
            key = f"{record_id}/layer.{layer}"
            self._tensors[key] = tensor.contiguous()
            self._bytes += tensor.numel() * tensor.element_size()
            keys.append(key)
        pointer = {"shard": shard, "keys": keys, "layers": sorted(tensors), "positions": message["positions"],
                   "dtype": message["dtype"], "is_before_steering": message["is_before_steering"]}
        self._entries.append({"id": record_id, **pointer})
        self._since = self._since or time.monotonic()
        return pointer

    @property
    def is_due(self) -> bool:
        """Whether the shard should be written now: it reached the size limit, or its records waited too long."""
        return bool(self._entries) and (self._bytes >= self.max_shard_bytes
                                        or time.monotonic() - self._since >= self.flush_seconds)

    def flush(self) -> None:
        """Write the buffered shard durably (see the class doc); a no-op when nothing is buffered. DiskLow, with
        nothing written, if the disk cannot take it and keep min_free_bytes free."""
        if not self._entries:
            return
        from safetensors.torch import save_file

        index_lines = "".join(json.dumps(entry) + "\n" for entry in self._entries).encode()
        self._check_space(self._bytes + _header_bytes(self._tensors) + len(index_lines))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self._next:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(self._tensors, str(tmp), metadata={"format": "pt"})
        commit_file(tmp, path)
        with (self.folder / INDEX_NAME).open("ab") as f:
            f.write(index_lines)
            f.flush()
            os.fsync(f.fileno())
        self.discard()
        self._next += 1

    def _check_space(self, num_bytes: int) -> None:
        need = num_bytes + self.min_free_bytes
        require_free(self.folder, need, f"; activation shard {self.folder.name}/{self._next:05d}.safetensors "
                     f"({len(self._entries)} records, {num_bytes / 1e6:.1f} MB) and the "
                     f"{self.min_free_bytes / 1e9:g} GB to keep free need {need / 1e9:.2f} GB. Nothing of that shard "
                     f"was written; every record before it is on disk")

    def discard(self) -> None:
        """Drop the buffered shard (written, or refused: its records run again on resume)."""
        self._tensors, self._entries, self._bytes, self._since = {}, [], 0, None


def _header_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """About the size of a safetensors header: 8 bytes, then a JSON entry (key, dtype, shape, offsets) per tensor."""
    return 8 + sum(len(key.encode()) + 96 for key in tensors)


def _records(output: Path):
    return (r for r in complete_records(output) if isinstance(r, dict) and isinstance(r.get("id"), str))


def load(output: str | Path, layers: list[int] | None = None, ids=None) -> dict[str, dict[int, torch.Tensor]]:
    """Activations of the result records of a results file: {id: {layer: tensor}}; `layers` and `ids` narrow it
    (only those tensors are read from the shards)."""
    from safetensors import safe_open

    output = Path(output)
    if not output.is_file():
        raise FileNotFoundError(f"{output}: no such results file")
    wanted = None if ids is None else set(ids)
    by_shard: dict[str, list[tuple[str, list[int], list[str]]]] = defaultdict(list)
    for record in _records(output):
        pointer = record.get("activations")
        if isinstance(pointer, dict) and (wanted is None or record["id"] in wanted):
            by_shard[pointer["shard"]].append((record["id"], pointer["layers"], pointer["keys"]))
    out: dict[str, dict[int, torch.Tensor]] = {}
    for shard, entries in by_shard.items():
        with safe_open(str(output.parent / shard), framework="pt") as f:
            for record_id, record_layers, keys in entries:
                out[record_id] = {layer: f.get_tensor(key) for layer, key in zip(record_layers, keys)
                                  if layers is None or layer in layers}
    return out
