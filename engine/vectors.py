"""Steering vector files: .safetensors, .pt and .npy (one vector, or one per layer as `layer.<L>` / `direction.<L>`)
and GGUF control vectors (repeng, llama.cpp); each vector checked against the model's layers and hidden size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.specs import RecordError, not_a_file

VECTOR_SUFFIXES = (".safetensors", ".pt", ".npy", ".gguf")
CONTROL_VECTOR_ARCH = "controlvector"  # the GGUF architecture repeng and llama.cpp use for steering vectors


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
            raise RecordError(f"steering vector {path}: tensor {tensor.name!r}; a control vector names them "
                              "direction.<L>")
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
    problem = not_a_file(file)
    if problem:
        raise RecordError(f"steering vector {path}: {problem}")
    try:
        data = _read_tensors(file)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's complaint (SafetensorError, UnpicklingError, EOFError...)
        # is about the user's file, so it is this record's error, never the run's
        raise RecordError(f"steering vector {path}: cannot read it as a {file.suffix} file ({type(exc).__name__}: "
                          f"{exc}); is it complete, and of the format its suffix says?") from None
    if isinstance(data, dict):
        if len(data) == 1 and not _is_layer_key(next(iter(data))):
            data = next(iter(data.values()))
        else:
            vectors = {}
            for key, tensor in data.items():
                if not _is_layer_key(key):
                    raise RecordError(f"steering vector {path}: key {key!r}; a file of several tensors names them "
                                      "layer.<L>")
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
    tensor = tensor.float()
    if not np.isfinite(tensor.numpy()).all():  # numpy: a tenth of torch's per-call cost on a 2,048-vector
        raise RecordError(f"{where}: contains NaN or inf")
    return tensor
