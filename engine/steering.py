"""Steering: vector files, and the SteeringTable that adds per-request vectors inside the decoder layers.

The table holds every loaded vector in one device tensor whose row 0 is zero. For each forward, each steered
layer gets a per-token (row index, coefficient) pair; its hook adds `coef * table[row]` to the layer's
output (the residual stream after layer L). Unsteered tokens point at row 0 with coefficient 0, so they get
exactly zero added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.request import RecordError

VECTOR_SUFFIXES = (".safetensors", ".pt", ".npy")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers (`model.model.layers` for Gemma, Llama, Qwen, Mistral)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: cannot find its decoder layers (expected model.model.layers)")
    return layers


def _read_tensors(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix == ".pt":
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, torch.Tensor):
            return obj
        raise RecordError(f"steering vector {path}: a .pt file must hold a tensor or a dict of tensors")
    if suffix == ".npy":
        return torch.from_numpy(np.load(str(path), allow_pickle=False))
    raise RecordError(f"steering vector {path}: unsupported format; use {', '.join(VECTOR_SUFFIXES)}")


def load_vectors(path: str, num_layers: int, hidden_size: int) -> dict[int | None, torch.Tensor]:
    """Vectors of a file keyed by layer (None: the same vector for every layer), validated, float32 on CPU.

    Accepted: one 1-D tensor; tensors named `layer.<L>`; or a 2-D array with one row per layer.
    """
    file = Path(path)
    if not file.is_file():
        raise RecordError(f"steering vector {path}: no such file")
    try:
        data = _read_tensors(file)
    except RecordError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecordError(f"steering vector {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict):
        if len(data) == 1:
            data = next(iter(data.values()))
        else:
            vectors = {}
            for key, tensor in data.items():
                if not key.startswith("layer.") or not key[6:].isdigit():
                    raise RecordError(f"steering vector {path}: key {key!r}; a file of several tensors names them layer.<L>")
                vectors[int(key[6:])] = tensor
            return {layer: _check(path, layer, t, num_layers, hidden_size) for layer, t in vectors.items()}
    if data.ndim == 2 and data.shape[0] == num_layers:
        return {layer: _check(path, layer, data[layer], num_layers, hidden_size) for layer in range(num_layers)}
    return {None: _check(path, None, data, num_layers, hidden_size)}


def _check(path: str, layer: int | None, tensor: torch.Tensor, num_layers: int, hidden_size: int) -> torch.Tensor:
    where = f"steering vector {path}" + ("" if layer is None else f" (layer.{layer})")
    if layer is not None and not 0 <= layer < num_layers:
        raise RecordError(f"{where}: layer {layer} is out of range; the model has layers 0..{num_layers - 1}")
    if tensor.ndim != 1 or tensor.shape[0] != hidden_size:
        raise RecordError(f"{where}: shape {tuple(tensor.shape)}, but the model's hidden size is {hidden_size}")
    if not tensor.is_floating_point():
        raise RecordError(f"{where}: dtype {tensor.dtype}; a steering vector must be floating point")
    if not torch.isfinite(tensor).all():
        raise RecordError(f"{where}: contains NaN or inf")
    return tensor.float()


class SteeringTable:
    """Device table of loaded vectors plus per-layer (row, coef) inputs read by forward hooks."""

    def __init__(self, model, device, dtype):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.device, self.dtype = device, dtype
        self.table = torch.zeros(1, self.hidden_size, dtype=torch.float32, device=device)
        self._rows: dict[tuple[str, int], int] = {}
        self._files: dict[str, dict | RecordError] = {}
        self._hooked: set[int] = set()
        self.active: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def resolve(self, spec: dict | None) -> dict[int, int]:
        """A request's steering spec -> {layer: table row}; loads vectors on first use; RecordError if bad."""
        if spec is None:
            return {}
        bad = [layer for layer in spec["layers"] if not 0 <= layer < self.num_layers]
        if bad:
            raise RecordError(f"steering layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
        vectors = self._file(spec["vector"])
        rows = {}
        for layer in spec["layers"]:
            vector = vectors.get(layer, vectors.get(None))
            if vector is None:
                raise RecordError(f"steering vector {spec['vector']}: no vector for layer {layer} (keys: layer.{sorted(k for k in vectors)})")
            rows[layer] = self._row(spec["vector"], layer, vector)
            self._hook(layer)
        return rows

    def _file(self, path: str) -> dict:
        if path not in self._files:
            try:
                self._files[path] = load_vectors(path, self.num_layers, self.hidden_size)
            except RecordError as exc:
                self._files[path] = exc
        entry = self._files[path]
        if isinstance(entry, RecordError):
            raise entry
        return entry

    def _row(self, path: str, layer: int, vector: torch.Tensor) -> int:
        key = (path, layer)
        if key not in self._rows:
            self._rows[key] = self.table.shape[0]
            self.table = torch.cat([self.table, vector.to(self.device)[None, :]])
        return self._rows[key]

    def _hook(self, layer: int) -> None:
        if layer in self._hooked:
            return
        # prepend: runs before transformers' own output-capture hooks, so captured states include steering.
        self.layers[layer].register_forward_hook(self._make_hook(layer), prepend=True)
        self._hooked.add(layer)

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            inputs = self.active.get(layer)
            if inputs is None:
                return None
            rows, coefs = inputs
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden + (coefs[..., None] * self.table[rows]).to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def set_inputs(self, per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-token (row [B, T] long, coef [B, T] float32) for each steered layer of the next forward."""
        self.active = per_layer


def coef_mask(positions: str, is_prompt: bool) -> bool:
    """Whether a token of the given kind is steered under `positions`."""
    return positions == "all" or (positions == "prompt") == is_prompt
