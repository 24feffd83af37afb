"""Captured activations on disk: the ActivationStore writes them as safetensors shards beside the results, durably,
before the result lines that point at them (engine.core.activations captures them); `load` reads them back, and
`tensors_of` turns the core's message into tensors."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from engine.storage.id_index import IdIndex
from engine.storage.files import commit_file, complete_records, require_free, write_atomic

if TYPE_CHECKING:  # torch is imported where tensors are made: a writer without activations never needs it
    import torch

MAX_SHARD_BYTES = 512 << 20
FLUSH_SECONDS = 30.0
INDEX_NAME = "index.jsonl"


def activations_dir(output: Path) -> Path:
    """The shard folder of a results file: results.jsonl -> results.activations/ (one per output, so several
    outputs can share a folder)."""
    return output.with_name(output.stem + ".activations")


class ActivationStore:
    """Safetensors shards `<results stem>.activations/00000.safetensors` (keys `<id>/layer.<L>`, and with SAE
    capture `<id>/sae.<L>.values` and `<id>/sae.<L>.indices`) and `index.jsonl` (one line per request: id, shard,
    keys, layers, positions, dtype, is_before_steering).

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

    def add(self, record_id: str, message: dict, tensors: dict[int | str, torch.Tensor]) -> dict:
        """Buffer one request's tensors (tensors_of's) for the current shard; the pointer its result record carries:
        `keys` in the shard, one per `layers` entry, then the SAE features' under `sae_keys`."""
        shard = f"{self.folder.name}/{self._next:05d}.safetensors"
        layers = sorted(name for name in tensors if isinstance(name, int))
        names = [*layers, *sorted(name for name in tensors if isinstance(name, str))]
        keys = []
        for name in names:
            key = f"{record_id}/layer.{name}" if isinstance(name, int) else f"{record_id}/{name}"
            self._tensors[key] = tensors[name].contiguous()
            self._bytes += tensors[name].numel() * tensors[name].element_size()
            keys.append(key)
        pointer = {"shard": shard, "keys": keys[:len(layers)], "layers": layers, "positions": message["positions"],
                   "dtype": message["dtype"], "is_before_steering": message["is_before_steering"]}
        if len(keys) > len(layers):
            pointer["sae_keys"] = keys[len(layers):]
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


# ---- messages between processes
def tensors_of(message: dict) -> dict[int | str, torch.Tensor]:
    """A message's activations as CPU tensors {layer: tensor}, with SAE capture also {"sae.<L>.values": [.., top_k]
    in the capture dtype, "sae.<L>.indices": int32}."""
    import torch

    dtype = getattr(torch, message["dtype"])

    def tensor(shape, data, kind):
        return torch.frombuffer(bytearray(data), dtype=kind).reshape(shape) if data else torch.empty(shape, dtype=kind)

    out: dict[int | str, torch.Tensor] = {int(layer): tensor(shape, data, dtype)
                                          for layer, (shape, data) in message["layers"].items()}
    for layer, parts in message.get("sae", {}).items():
        out[f"sae.{int(layer)}.values"] = tensor(*parts["values"], dtype)
        out[f"sae.{int(layer)}.indices"] = tensor(*parts["indices"], torch.int32)
    return out


# ---- on disk
def _records(output: Path):
    return (r for r in complete_records(output) if isinstance(r, dict) and isinstance(r.get("id"), str))


def load(output: str | Path, layers: list[int] | None = None, ids=None) -> dict[str, dict[int | str, torch.Tensor]]:
    """Activations of the result records of a results file: {id: {layer: tensor}}, with SAE capture also
    {"sae.<L>.values": tensor, "sae.<L>.indices": int32 tensor}; `layers` and `ids` narrow it (only those tensors
    are read from the shards; `layers` narrows the SAE features by their layer too)."""
    from safetensors import safe_open

    output = Path(output)
    if not output.is_file():
        raise FileNotFoundError(f"{output}: no such results file")
    wanted = None if ids is None else set(ids)
    by_shard: dict[str, list[tuple[str, list[int], list[str]]]] = defaultdict(list)
    for record in _records(output):
        pointer = record.get("activations")
        if isinstance(pointer, dict) and (wanted is None or record["id"] in wanted):
            names = [*pointer["layers"], *(key.rsplit("/", 1)[1] for key in pointer.get("sae_keys", ()))]
            by_shard[pointer["shard"]].append((record["id"], names, [*pointer["keys"], *pointer.get("sae_keys", ())]))
    out: dict[str, dict[int | str, torch.Tensor]] = {}
    for shard, entries in by_shard.items():
        with safe_open(str(output.parent / shard), framework="pt") as f:
            for record_id, names, keys in entries:
                out[record_id] = {name: f.get_tensor(key) for name, key in zip(names, keys)
                                  if layers is None or _layer_of(name) in layers}
    return out


def _layer_of(name: int | str) -> int:
    """The layer of a loaded tensor's name: L, or "sae.<L>.values" / "sae.<L>.indices"."""
    return name if isinstance(name, int) else int(name.split(".")[1])
