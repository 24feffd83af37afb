"""Steering vector files: .safetensors, .pt and .npy (one vector, or one per layer as `layer.<L>` / `direction.<L>`)
and GGUF control vectors (repeng, llama.cpp); each vector checked against the model's layers and hidden size. The
layers a file names (named_layers) are what a term without layers steers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.specs import RecordError, not_a_file

if TYPE_CHECKING:
    import torch  # imported where a tensor is made: named_layers runs in engine-run's parent, which has no torch

VECTOR_SUFFIXES = (".safetensors", ".pt", ".npy", ".gguf")
CONTROL_VECTOR_ARCH = "controlvector"  # the GGUF architecture repeng and llama.cpp use for steering vectors


def _read_tensors(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    import torch

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
    import torch

    reader = _control_vector_reader(path)
    return {f"layer.{int(tensor.name[10:])}": torch.from_numpy(np.array(tensor.data, dtype=np.float32))
            for tensor in reader.tensors}


def _control_vector_names(path: Path) -> list[str]:
    """A GGUF control vector's tensors under this engine's names, `layer.<L>`, their data not read (it is mapped)."""
    return [f"layer.{int(tensor.name[10:])}" for tensor in _control_vector_reader(path).tensors]


def _control_vector_reader(path: Path):
    """A GGUFReader of a control vector; RecordError for another architecture or a tensor not named direction.<L>."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    arch = field.parts[field.data[0]].tobytes().decode() if field is not None else None
    if arch != CONTROL_VECTOR_ARCH:
        raise RecordError(f"steering vector {path}: a GGUF of architecture {arch!r}, not a control vector "
                          f"({CONTROL_VECTOR_ARCH!r})")
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction.") or not tensor.name[10:].isdigit():
            raise RecordError(f"steering vector {path}: tensor {tensor.name!r}; a control vector names them "
                              "direction.<L>")
    return reader


def save_vectors(path: str, vectors: dict[int, torch.Tensor], model_hint: str = "") -> None:
    """Write per-layer vectors {layer: [hidden]} as .safetensors / .pt (`layer.<L>`) or a GGUF control vector
    (`direction.<L>`, readable by llama.cpp's --control-vector and repeng)."""
    suffix = Path(path).suffix.lower()
    named = {f"layer.{layer}": v.detach().float().cpu().contiguous() for layer, v in sorted(vectors.items())}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(named, path)
    elif suffix == ".pt":
        import torch

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

    Accepted: one 1-D tensor; tensors named `layer.<L>`; or a 2-D array with one row per layer. Its layers (the keys
    that are not None) are those named_layers reads without the model.
    """
    data = _read_checked(path, _read_tensors)
    if isinstance(data, dict):
        if len(data) == 1 and not _is_layer_key(next(iter(data))):
            data = next(iter(data.values()))
        else:
            _layers_of_keys(path, data)
            return {int(key[6:]): _check(path, int(key[6:]), t, num_layers, hidden_size) for key, t in data.items()}
    if data.ndim == 2:
        if data.shape[0] != num_layers:
            raise RecordError(f"steering vector {path}: a 2-D array of {data.shape[0]} row(s); an array of one row per "
                              f"layer needs {num_layers}, the model's layers (or give one 1-D vector)")
        return {layer: _check(path, layer, data[layer], num_layers, hidden_size) for layer in range(num_layers)}
    return {None: _check(path, None, data, num_layers, hidden_size)}


def named_layers(path: str) -> tuple[int, ...] | None:
    """The layers a vector file names (sorted), read without the model and, where the format allows it, without its
    tensors (a safetensors header, GGUF tensor names, a .npy header; a .pt is loaded): `layer.<L>` keys, a control
    vector's `direction.<L>`, or 0..rows-1 of a 2-D array. None: one vector with no layer named, which steers the
    layers a term gives. The layers load_vectors keys (less None); checked against the model there. RecordError if
    the file cannot be read."""
    data = _read_checked(path, _read_shapes)
    if isinstance(data, dict):
        if len(data) != 1 or _is_layer_key(next(iter(data))):
            return _layers_of_keys(path, data)
        data = next(iter(data.values()))
    if len(data) not in (1, 2):
        raise RecordError(f"steering vector {path}: shape {data}; give a 1-D vector, tensors named layer.<L>, or a "
                          f"2-D array of one row per layer")
    return tuple(range(data[0])) if len(data) == 2 else None


def unnamed_layers_error(path: str) -> RecordError:
    """The error of a term that leaves its layers to a file of one vector with no layer named."""
    return RecordError(f"steering vector {path}: one vector with no layer named; give the layers to steer "
                       f"(\"layers\": [6] in a record, --steer-layer 6)")


def _read_checked(path: str, read):
    """read(Path(path)), any parser's complaint made this record's RecordError naming the file."""
    file = Path(path)
    problem = not_a_file(file)
    if problem:
        raise RecordError(f"steering vector {path}: {problem}")
    try:
        return read(file)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's complaint (SafetensorError, UnpicklingError, EOFError...)
        # is about the user's file, so it is this record's error, never the run's
        raise RecordError(f"steering vector {path}: cannot read it as a {file.suffix} file ({type(exc).__name__}: "
                          f"{exc}); is it complete, and of the format its suffix says?") from None


def _read_shapes(path: Path) -> dict[str, tuple] | tuple:
    """What named_layers needs of a file: its tensors' names and shapes, or the shape of its one tensor."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:  # the header only; numpy: no torch in the parent
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if suffix == ".npy":
        return tuple(np.load(str(path), mmap_mode="r", allow_pickle=False).shape)
    if suffix == ".gguf":
        return {name: (0,) for name in _control_vector_names(path)}  # every name is direction.<L>: shapes unneeded
    data = _read_tensors(path)
    return {key: tuple(t.shape) for key, t in data.items()} if isinstance(data, dict) else tuple(data.shape)


def _layers_of_keys(path: str, data: dict) -> tuple[int, ...]:
    """The layers a file of several tensors (or of one `layer.<L>`) names; RecordError for a key that names none."""
    for key in data:
        if not _is_layer_key(key):
            raise RecordError(f"steering vector {path}: key {key!r}; a file of several tensors names them layer.<L>")
    return tuple(sorted(int(key[6:]) for key in data))


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
