"""Sparse autoencoders read from their published formats, for SAE steering terms and SAE capture.

Formats (`load_sae`):
- Gemma Scope `params.npz`: `W_enc [d_model, d_sae]`, `W_dec [d_sae, d_model]`, `b_enc`, `b_dec`, `threshold`
  (JumpReLU); the layer from a `layer_<L>` part of its path.
- A folder (or its file) with `params.safetensors` and `config.json` (Gemma Scope 2): the same arrays, keys in either
  case; JumpReLU unless the config names another activation; the layer from the config's hook point
  (`model.layers.<L>.output`) or a `layer_<L>` part of the path.
- A SAELens folder: `cfg.json` + `sae_weights.safetensors`; ReLU ("standard"), JumpReLU (`threshold` or
  `log_threshold`) and TopK (`k`); `hook_name` `blocks.<L>.hook_resid_post` is layer L's output,
  `blocks.<L>.hook_resid_pre` layer L-1's; `apply_b_dec_to_input` subtracts b_dec before encoding.
- Qwen-Scope `.pt`: a dict of tensors (TopK, `k` in it or in a `config.json` beside it) whose `W_dec` is stored
  transposed, `[d_model, d_sae]`.

Every array is float32 on the CPU; the device holds only what a request uses (steering) or the encoder (capture).
Whatever does not fit the model is the record's RecordError naming the file and what to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.specs import RecordError, not_a_file

ACTIVATIONS = ("relu", "jumprelu", "topk")
_LAYER_PART = re.compile(r"(?:^|[^a-z])layer_(\d+)(?:$|[^0-9])")
_HF_HOOK = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)(?:\.output)?$")
_SAELENS_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass(frozen=True)
class Sae:
    """An SAE's arrays (float32, numpy) and how it encodes: f = act(x' @ w_enc + b_enc), x' = x - b_dec when
    is_b_dec_subtracted else x; its decoder reconstructs f @ w_dec + b_dec."""

    path: str
    w_enc: np.ndarray  # [d_model, d_sae]
    b_enc: np.ndarray  # [d_sae]
    w_dec: np.ndarray  # [d_sae, d_model]
    b_dec: np.ndarray  # [d_model]
    activation: str  # one of ACTIVATIONS
    threshold: np.ndarray | None = None  # [d_sae]; jumprelu: f = p where p > threshold
    k: int | None = None  # topk: the k largest pre-activations kept (ReLU'd)
    layer: int | None = None  # the layer whose output it reads, when its files say
    is_b_dec_subtracted: bool = False

    @property
    def d_model(self) -> int:
        return self.w_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.w_enc.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations [n, d_sae] of residuals x [n, d_model] (float32), as the SAE's own code computes them."""
        inputs = x - self.b_dec if self.is_b_dec_subtracted else x
        pre = inputs @ self.w_enc + self.b_enc
        if self.activation == "jumprelu":
            return np.where(pre > self.threshold, pre, 0.0).astype(np.float32)
        if self.activation == "topk":
            keep = np.argpartition(-pre, self.k - 1, axis=-1)[:, :self.k]
            out = np.zeros_like(pre)
            np.put_along_axis(out, keep, np.maximum(np.take_along_axis(pre, keep, axis=-1), 0.0), axis=-1)
            return out
        return np.maximum(pre, 0.0)


def load_sae(path: str, num_layers: int, hidden_size: int) -> Sae:
    """The SAE at `path` (a file or its folder), checked against the model's layers and hidden size."""
    where = Path(path)
    if not where.is_dir():
        problem = not_a_file(where)
        if problem:
            raise RecordError(f"SAE {path}: {problem}")
    try:
        sae = _read(path, where)
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's complaint (SafetensorError, UnpicklingError, JSON, zip...)
        # is about the user's files, so it is this record's error, never the run's
        raise RecordError(f"SAE {path}: cannot read it ({type(exc).__name__}: {exc}); is it complete, and one of "
                          "the formats docs/steering.md lists?") from None
    _check(sae, num_layers, hidden_size)
    return sae


def sae_layer_or_error(sae: Sae, layer: int | None) -> int:
    """The layer an SAE term or capture acts at: the one it gives, else the SAE's own."""
    if layer is not None:
        return layer
    if sae.layer is None:
        raise RecordError(f"SAE {sae.path}: its files do not say which layer's output it reads; give \"layers\": [L] "
                          "(the term) or \"layer\": L (the capture)")
    return sae.layer


def _read(path: str, where: Path) -> Sae:
    if where.is_dir():
        if (where / "cfg.json").is_file() and (where / "sae_weights.safetensors").is_file():
            return _saelens(path, where)
        if (where / "params.safetensors").is_file():
            return _safetensors_with_config(path, where / "params.safetensors")
        if (where / "params.npz").is_file():
            return _gemma_scope_npz(path, where / "params.npz")
        raise RecordError(f"SAE {path}: a folder with none of params.npz, params.safetensors (+ config.json), or "
                          "cfg.json + sae_weights.safetensors (SAELens); give the SAE's file or folder")
    suffix = where.suffix.lower()
    if suffix == ".npz":
        return _gemma_scope_npz(path, where)
    if suffix == ".safetensors":
        if where.name == "sae_weights.safetensors" and (where.parent / "cfg.json").is_file():
            return _saelens(path, where.parent)
        return _safetensors_with_config(path, where)
    if suffix == ".pt":
        return _qwen_scope(path, where)
    raise RecordError(f"SAE {path}: unsupported format {suffix or '(no suffix)'}; give a Gemma Scope params.npz, a "
                      "params.safetensors with its config.json, a SAELens folder or a Qwen-Scope .pt")


def _gemma_scope_npz(path: str, file: Path) -> Sae:
    with np.load(str(file), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays = _arrays(path, arrays)
    if "threshold" not in arrays:
        raise RecordError(f"SAE {path}: a Gemma Scope params.npz is JumpReLU but this one has no 'threshold' array")
    return _sae(path, arrays, "jumprelu", layer=_layer_in_path(file))


def _safetensors_with_config(path: str, file: Path) -> Sae:
    config_file = file.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    arrays = _arrays(path, _safetensors(file))
    name = str(config.get("architecture") or config.get("activation") or "jumprelu").lower().replace("_", "")
    activation = {"jumprelu": "jumprelu", "relu": "relu", "standard": "relu", "topk": "topk"}.get(name)
    if activation is None:
        raise RecordError(f"SAE {path}: config.json names activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    hook = config.get("hf_hook_point_in") or config.get("hook_point") or config.get("hf_hook_point_out")
    layer = _hf_hook_layer(path, hook) if hook else config.get("layer", _layer_in_path(file))
    return _sae(path, arrays, activation, k=config.get("k"), layer=layer)


def _saelens(path: str, folder: Path) -> Sae:
    cfg = json.loads((folder / "cfg.json").read_text())
    arrays = _arrays(path, _safetensors(folder / "sae_weights.safetensors"))
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise RecordError(f"SAE {path}: normalize_activations is {norm!r}; this engine applies SAEs to the raw "
                          "residual stream, so only 'none' is supported")
    architecture = str(cfg.get("architecture", "standard")).lower().replace("_", "")
    activation_fn = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    if architecture == "jumprelu":
        activation = "jumprelu"
        if "threshold" not in arrays and "log_threshold" in arrays:
            arrays["threshold"] = np.exp(arrays.pop("log_threshold"))
    elif architecture == "topk" or activation_fn == "topk":
        activation = "topk"
    elif architecture == "standard" and activation_fn == "relu":
        activation = "relu"
    else:
        raise RecordError(f"SAE {path}: architecture {cfg.get('architecture')!r} with activation {activation_fn!r}; "
                          "supported: standard (relu), jumprelu, topk")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    hook = cfg.get("hook_name") or cfg.get("hook_point")
    layer = None
    if hook:
        match = _SAELENS_HOOK.match(str(hook))
        if match is None:
            raise RecordError(f"SAE {path}: it reads hook {hook!r}; the engine applies SAEs to the residual stream, "
                              "blocks.<L>.hook_resid_post or blocks.<L>.hook_resid_pre")
        layer = int(match.group(1)) - (match.group(2) == "pre")
        if layer < 0:
            raise RecordError(f"SAE {path}: it reads {hook!r}, the embeddings before layer 0, which no steering "
                              "term or capture reaches; use an SAE of a layer's output")
    return _sae(path, arrays, activation, k=k, layer=layer,
                is_b_dec_subtracted=bool(cfg.get("apply_b_dec_to_input", False)))


def _qwen_scope(path: str, file: Path) -> Sae:
    import torch

    obj = torch.load(str(file), map_location="cpu", weights_only=True)
    for key in ("state_dict", "sae", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise RecordError(f"SAE {path}: a .pt SAE must hold a dict of tensors (W_enc, W_dec, b_enc, b_dec)")
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor) and value.ndim > 0}
    arrays = _arrays(path, {key: value.float().numpy() for key, value in tensors.items()})
    k = next((obj[key] for key in ("k", "top_k", "topk") if key in obj), None)
    config_file = file.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if k is None:
        k = config.get("k") or config.get("top_k")
    if isinstance(k, torch.Tensor):
        k = int(k.item())
    w_dec = arrays["W_dec"]
    if w_dec.ndim == 2 and w_dec.shape == arrays["W_enc"].shape:  # Qwen-Scope stores W_dec as [d_model, d_sae]
        arrays["W_dec"] = np.ascontiguousarray(w_dec.T)
    hook = config.get("hook_point") or config.get("hf_hook_point_in")
    layer = _hf_hook_layer(path, hook) if hook else config.get("layer", _layer_in_path(file))
    return _sae(path, arrays, "topk", k=k, layer=layer)


def _safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file  # torch: numpy has no bfloat16, in which SAEs are often saved

    return {key: value.float().numpy() for key, value in load_file(str(file)).items()}


def _arrays(path: str, arrays: dict) -> dict[str, np.ndarray]:
    """The SAE's arrays under W_enc / W_dec / b_enc / b_dec / threshold / log_threshold (keys in either case)."""
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "log_threshold": "log_threshold"}
    out = {}
    for key, value in arrays.items():
        name = names.get(key.lower())
        if name is None:
            continue
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise RecordError(f"SAE {path}: array {key!r} is {value.dtype}; an SAE's arrays are floating point")
        out[name] = value.astype(np.float32)
    missing = [name for name in ("W_enc", "W_dec", "b_enc", "b_dec") if name not in out]
    if missing:
        raise RecordError(f"SAE {path}: no {', '.join(missing)} array(s); it holds {sorted(arrays)}")
    return out


def _sae(path: str, arrays: dict, activation: str, k=None, layer=None, is_b_dec_subtracted: bool = False) -> Sae:
    if activation == "jumprelu" and "threshold" not in arrays:
        raise RecordError(f"SAE {path}: a JumpReLU SAE needs a 'threshold' array (or SAELens' 'log_threshold')")
    if activation == "topk" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise RecordError(f"SAE {path}: a TopK SAE needs its k, a positive integer, in its config (got {k!r})")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise RecordError(f"SAE {path}: its config's layer {layer!r} is not a layer index")
    return Sae(path, np.ascontiguousarray(arrays["W_enc"]), arrays["b_enc"], np.ascontiguousarray(arrays["W_dec"]),
               arrays["b_dec"], activation, arrays.get("threshold") if activation == "jumprelu" else None,
               k if activation == "topk" else None, layer, is_b_dec_subtracted)


def _check(sae: Sae, num_layers: int, hidden_size: int) -> None:
    """Shapes against each other and the model; the layer against the model's."""
    enc, dec = sae.w_enc.shape, sae.w_dec.shape
    if len(enc) != 2 or len(dec) != 2:
        raise RecordError(f"SAE {sae.path}: W_enc {enc} and W_dec {dec} must be matrices")
    if enc[0] != hidden_size:
        raise RecordError(f"SAE {sae.path}: it reads vectors of width {enc[0]} (W_enc {enc}), but the model's hidden "
                          f"size is {hidden_size}; use an SAE trained on this model")
    expected = {"W_dec": ((enc[1], hidden_size), dec), "b_enc": ((enc[1],), sae.b_enc.shape),
                "b_dec": ((hidden_size,), sae.b_dec.shape)}
    if sae.threshold is not None:
        expected["threshold"] = ((enc[1],), sae.threshold.shape)
    for name, (want, got) in expected.items():
        if want != got:
            raise RecordError(f"SAE {sae.path}: {name} has shape {got}; with W_enc {enc} it must be {want}")
    if sae.k is not None and sae.k > sae.d_sae:
        raise RecordError(f"SAE {sae.path}: k {sae.k} exceeds its {sae.d_sae} features")
    if sae.layer is not None and not 0 <= sae.layer < num_layers:
        raise RecordError(f"SAE {sae.path}: it reads layer {sae.layer}, but the model has layers 0..{num_layers - 1}")


def _layer_in_path(file: Path) -> int | None:
    """L of the last `layer_<L>` part of a path (Gemma Scope: layer_12/width_16k/..., layer_5_width_16k_l0_big)."""
    for part in reversed(file.parts):
        match = _LAYER_PART.search(part.lower())
        if match:
            return int(match.group(1))
    return None


def _hf_hook_layer(path: str, hook) -> int:
    match = _HF_HOOK.match(str(hook))
    if match is None:
        raise RecordError(f"SAE {path}: its config's hook point {hook!r} is not a layer's output "
                          "(model.layers.<L>.output); the engine applies SAEs to the residual stream")
    return int(match.group(1))
