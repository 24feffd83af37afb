"""Steering: vector files, and the SteeringTable that adds per-request vectors inside the decoder layers.

The table holds every loaded vector in one device tensor whose row 0 is zero. For each forward, each steered
layer gets a per-token (row index, coefficient) pair; its hook adds `coef * table[row]` to the layer's
output (the residual stream after layer L). Unsteered tokens point at row 0 with coefficient 0, so they get
exactly zero added.
"""

from __future__ import annotations

import hashlib

from pathlib import Path

import numpy as np
import torch

from engine.request import RecordError, steering_terms

VECTOR_SUFFIXES = (".safetensors", ".pt", ".npy", ".gguf")
CONTROL_VECTOR_ARCH = "controlvector"  # the GGUF architecture repeng and llama.cpp use for steering vectors


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
    if suffix == ".gguf":
        return _read_control_vector(path)
    raise RecordError(f"steering vector {path}: unsupported format; use {', '.join(VECTOR_SUFFIXES)}")


def _read_control_vector(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF control vector: tensors `direction.<L>`, applied to the output of decoder layer L (0-based), the
    convention of llama.cpp and repeng. Returned under this engine's names, `layer.<L>`."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    arch = field.parts[field.data[0]].tobytes().decode() if field is not None else None
    if arch != CONTROL_VECTOR_ARCH:
        raise RecordError(f"steering vector {path}: a GGUF of architecture {arch!r}, not a control vector "
                          f"({CONTROL_VECTOR_ARCH!r})")
    tensors = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction.") or not tensor.name[10:].isdigit():
            raise RecordError(f"steering vector {path}: tensor {tensor.name!r}; a control vector names them direction.<L>")
        tensors[f"layer.{int(tensor.name[10:])}"] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return tensors


def save_vectors(path: str, vectors: dict[int, torch.Tensor], model_hint: str = "") -> None:
    """Write per-layer vectors {layer: [hidden]} as .safetensors / .pt (`layer.<L>`) or a GGUF control vector
    (`direction.<L>`, readable by llama.cpp's --control-vector and repeng)."""
    suffix = Path(path).suffix.lower()
    named = {f"layer.{layer}": v.detach().float().cpu().contiguous() for layer, v in sorted(vectors.items())}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(named, path)
    elif suffix == ".pt":
        torch.save(named, path)
    elif suffix == ".gguf":
        import gguf

        writer = gguf.GGUFWriter(path, CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(vectors))
        for layer, vector in sorted(vectors.items()):
            writer.add_tensor(f"direction.{layer}", vector.detach().float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    else:
        raise ValueError(f"{path}: write vectors as .safetensors, .pt or .gguf")


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
        if len(data) == 1 and not _is_layer_key(next(iter(data))):
            data = next(iter(data.values()))
        else:
            vectors = {}
            for key, tensor in data.items():
                if not _is_layer_key(key):
                    raise RecordError(f"steering vector {path}: key {key!r}; a file of several tensors names them layer.<L>")
                vectors[int(key[6:])] = tensor
            return {layer: _check(path, layer, t, num_layers, hidden_size) for layer, t in vectors.items()}
    if data.ndim == 2 and data.shape[0] == num_layers:
        return {layer: _check(path, layer, data[layer], num_layers, hidden_size) for layer in range(num_layers)}
    return {None: _check(path, None, data, num_layers, hidden_size)}


def _is_layer_key(key: str) -> bool:
    return key.startswith("layer.") and key[6:].isdigit()


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
    """Device table of loaded vectors plus per-layer (row, coef) inputs read by forward hooks.

    The table and the per-slot decode buffers are preallocated and only grow by reallocation, which bumps
    `version`; the runner re-captures its CUDA graphs when the version changes.
    """

    def __init__(self, model, device, num_slots: int, capacity: int = 1024):
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = model.config.get_text_config().hidden_size
        self.device = device
        self.table = torch.zeros(capacity, self.hidden_size, dtype=torch.float32, device=device)
        self.num_rows = 1  # row 0 stays zero: "no vector"
        self.slot_rows: dict[int, torch.Tensor] = {}  # layer -> [num_slots] row used at decode
        self.slot_coef: dict[int, torch.Tensor] = {}  # layer -> [num_slots] coef used at decode
        self.num_slots = num_slots
        self.version = 0
        self._rows: dict[bytes, int] = {}
        self._files: dict[str, dict | RecordError] = {}
        self.active: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def resolve(self, spec: dict | list | None) -> tuple[dict[int, int], dict[int, int]]:
        """A request's steering spec -> ({layer: row} for prompt tokens, {layer: row} for generated tokens).

        The terms of a spec are summed per layer and position kind (coefficients included) into one table
        row, so any number of terms costs one gather-multiply-add per steered layer. RecordError if bad.
        """
        sums: tuple[dict, dict] = ({}, {})
        for term in steering_terms(spec):
            bad = [layer for layer in term["layers"] if not 0 <= layer < self.num_layers]
            if bad:
                raise RecordError(f"steering layer(s) {bad} out of range; the model has layers 0..{self.num_layers - 1}")
            vectors = self._file(term["vector"])
            missing = [layer for layer in term["layers"] if layer not in vectors and None not in vectors]
            if missing:
                raise RecordError(f"steering vector {term['vector']}: no vector for layer(s) {missing} "
                                  f"(it has layer.{sorted(vectors)})")
            kinds = [sums[i] for i, is_prompt in enumerate((True, False)) if coef_mask(term["positions"], is_prompt)]
            for layer in term["layers"]:
                added = term["coef"] * vectors.get(layer, vectors.get(None))
                for kind in kinds:
                    kind[layer] = kind[layer] + added if layer in kind else added
        for layer in {*sums[0], *sums[1]}:
            self._hook(layer)
        return tuple({layer: self._row(v) for layer, v in kind.items()} for kind in sums)

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

    def _row(self, vector: torch.Tensor) -> int:
        """The table row holding `vector` (rows are shared by content)."""
        key = hashlib.blake2b(vector.numpy().tobytes(), digest_size=16).digest()
        if key not in self._rows:
            if self.num_rows == self.table.shape[0]:
                grown = torch.zeros(2 * self.num_rows, self.hidden_size, dtype=torch.float32, device=self.device)
                grown[:self.num_rows] = self.table
                self.table = grown
                self.version += 1
            self.table[self.num_rows] = vector.to(self.device)
            self._rows[key] = self.num_rows
            self.num_rows += 1
        return self._rows[key]

    def _hook(self, layer: int) -> None:
        if layer in self.slot_rows:
            return
        # prepend: runs before transformers' own output-capture hooks, so captured states include steering.
        self.layers[layer].register_forward_hook(self._make_hook(layer), prepend=True)
        self.slot_rows[layer] = torch.zeros(self.num_slots, dtype=torch.int64, device=self.device)
        self.slot_coef[layer] = torch.zeros(self.num_slots, dtype=torch.float32, device=self.device)
        self.version += 1

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

    def assign(self, seqs) -> None:
        """Set each admitted sequence's decode-time row in its slot, for every hooked layer."""
        if not self.slot_rows:
            return
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.int64).to(self.device)
        for layer in self.slot_rows:
            rows, coefs = self._rows_coefs([s.generated_rows.get(layer, 0) for s in seqs])
            self.slot_rows[layer].index_copy_(0, slots, rows)
            self.slot_coef[layer].index_copy_(0, slots, coefs)

    def _rows_coefs(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids and their coefficients (1 where a row is set: coefficients live in the summed rows)."""
        coefs = torch.tensor([1.0 if r else 0.0 for r in rows], dtype=torch.float32)
        return torch.tensor(rows, dtype=torch.int64).to(self.device), coefs.to(self.device)

    def set_active(self, per_layer: dict) -> None:
        """Per-token (row, coef) tensors of each hooked layer for the next forward; {} turns steering off."""
        self.active = per_layer

    def decode_inputs(self, num_rows: int) -> dict:
        return {layer: (self.slot_rows[layer][:num_rows, None], self.slot_coef[layer][:num_rows, None])
                for layer in self.slot_rows}

    def prefill_inputs(self, seqs, token_mask: torch.Tensor) -> dict:
        """Per hooked layer: (row [P, T], coef [P, T]) for the prompt tokens of a prefill batch."""
        inputs = {}
        for layer in self.slot_rows:
            rows, coefs = self._rows_coefs([s.prompt_rows.get(layer, 0) for s in seqs])
            inputs[layer] = (rows[:, None] * token_mask, coefs[:, None] * token_mask)
        return inputs


def coef_mask(positions: str, is_prompt: bool) -> bool:
    """Whether a token of the given kind is steered under `positions`."""
    return positions == "all" or (positions == "prompt") == is_prompt
