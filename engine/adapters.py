"""PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors` or `.bin`): their settings read
and checked without torch or peft (EngineConfig checks them before any process starts), which modules of a model
they target, each module's rank and scale, and their weights (engine.core.lora puts them inside the model).

What PEFT's LoRA does and the engine does not (DoRA, bias terms, modules saved whole, ...) is refused by name: an
adapter runs exactly as PEFT runs it, or not at all.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.storage.files import JsonUnreadable, parse_json

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
BASE = "base"  # not an adapter's name: the base model, in a sweep's grid.adapters
# adapter_config.json keys that change nothing at inference (bookkeeping, dropout, how the weights were initialised)
IGNORED_KEYS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                "lora_dropout", "init_lora_weights", "megatron_core", "loftq_config", "eva_config", "corda_config",
                "lora_ga_config", "qalora_group_size", "ensure_weight_tying"}
# keys read here, with the values a LoRA the engine runs may have where it is a switch
READ_KEYS = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_WEIGHT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight")


class AdapterError(ValueError):
    """An adapter directory the engine cannot run; the message names the directory, the problem and what to do
    (EngineConfig reports it as a ConfigError, the engine core as engine.core.lora.AdapterRefused)."""


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One adapter's settings from its adapter_config.json, as PEFT reads them."""

    name: str
    directory: str
    weights: str  # the weight file's path
    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # names (a module is targeted if its name is one or ends in ".<name>"), or
    exclude_modules: tuple[str, ...] | str  # a regex that must match the whole name
    layers_to_transform: tuple[int, ...]  # empty: every layer
    layers_pattern: tuple[str, ...]
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]

    @property
    def label(self) -> str:
        return f"--adapter {self.name}={self.directory}"

    def targets(self, key: str, is_linear: bool) -> bool:
        """Whether PEFT puts this LoRA on the module named `key` (its name in model.named_modules())."""
        if self.exclude_modules and _matches(self.exclude_modules, key):
            return False
        if self.target_modules == "all-linear":  # PEFT's shorthand for the names of every linear but the output layer
            if not is_linear:
                return False
        elif isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        elif key in self.target_modules:
            return True  # named whole: PEFT reads layers_to_transform only for names that end a module's name
        elif not any(key.endswith(f".{name}") for name in self.target_modules):
            return False
        if not self.layers_to_transform:
            return True
        index = _layer_index(key, self.layers_pattern)
        return index is not None and index in self.layers_to_transform

    def rank_and_scale(self, key: str) -> tuple[int, float]:
        """(r, the scale its B A product is added with) of module `key`: rank_pattern / alpha_pattern where one of
        their patterns ends the name, alpha / r (alpha / sqrt(r) with use_rslora)."""
        r = int(_pattern_value(self.rank_pattern, key, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, key, self.alpha))
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def adapter_names(adapters: dict[str, str]) -> list[str]:
    """The adapters' names in index order (index 0 is the base model, so name i is index i + 1): sorted, so every
    process numbers them alike."""
    return sorted(adapters)


def check_adapters(adapters) -> dict[str, str]:
    """EngineConfig.adapters checked: names and directories whose settings the engine runs (read_adapter for each)."""
    if not isinstance(adapters, dict):
        raise AdapterError(f"adapters is {adapters!r}; give a mapping of names to PEFT LoRA directories, e.g. "
                           f"--adapter NAME=DIR")
    for name, directory in adapters.items():
        read_adapter(name, directory)
    return adapters


def read_adapter(name, directory) -> LoraAdapter:
    """The LoraAdapter of a PEFT LoRA directory, or AdapterError naming what is wrong with it and what to do."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE:
        raise AdapterError(f"--adapter {name!r}: an adapter's name is letters, digits, '_', '.' or '-' (not '{BASE}', "
                           f"which names the base model); give --adapter NAME=DIR")
    label = f"--adapter {name}={directory}"
    if not isinstance(directory, str) or not directory:
        raise AdapterError(f"{label}: give the adapter's directory as a path")
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterError(f"{label}: no such directory; give the folder PEFT's save_pretrained wrote "
                           f"({CONFIG_FILE} and {WEIGHT_FILES[0]})")
    settings = _read_config(folder / CONFIG_FILE, label)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise AdapterError(f"{label}: no {' or '.join(WEIGHT_FILES)} there; give the folder PEFT's save_pretrained "
                           "wrote")
    return _parse(settings, name, directory, str(weights), label)


def _read_config(path: Path, label: str) -> dict:
    try:
        settings = parse_json(path.read_bytes())
    except FileNotFoundError:
        raise AdapterError(f"{label}: no {CONFIG_FILE} there, so it is no PEFT adapter; give the folder PEFT's "
                           f"save_pretrained wrote") from None
    except (OSError, JsonUnreadable) as exc:
        raise AdapterError(f"{label}: cannot read {path} ({exc}); give a PEFT adapter with a valid {CONFIG_FILE}") \
            from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{label}: {path} holds no JSON object; give a PEFT adapter with a valid {CONFIG_FILE}")
    return settings


def _parse(settings: dict, name: str, directory: str, weights: str, label: str) -> LoraAdapter:
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{label}: peft_type is {settings.get('peft_type')!r}; the engine runs LoRA adapters "
                           f"(peft_type \"LORA\") only")
    unsupported = [key for key, value in settings.items()
                   if key not in IGNORED_KEYS | READ_KEYS and value not in (None, False, [], {}, "", 0)]
    if settings.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")  # GPT-2's Conv1D layers; the families the engine runs use nn.Linear
    if settings.get("bias", "none") != "none":
        unsupported.append(f"bias={settings['bias']!r}")
    if unsupported:
        raise AdapterError(f"{label}: {CONFIG_FILE} sets {', '.join(sorted(unsupported))}, which the engine does not "
                           f"implement; use a plain LoRA (no DoRA, no LoRA bias, no modules saved whole), or merge "
                           f"this adapter into the model (PEFT's merge_and_unload) and run that as --model")
    r, alpha = settings.get("r", 8), settings.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{label}: r is {r!r}; a LoRA's rank is an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{label}: lora_alpha is {alpha!r}; it must be a finite number")
    return LoraAdapter(
        name=name, directory=directory, weights=weights, r=r, alpha=float(alpha),
        use_rslora=bool(settings.get("use_rslora", False)),
        target_modules=_names(settings.get("target_modules"), "target_modules", label, required=True),
        exclude_modules=_names(settings.get("exclude_modules"), "exclude_modules", label),
        layers_to_transform=_layers(settings.get("layers_to_transform"), label),
        layers_pattern=_strings(settings.get("layers_pattern"), "layers_pattern", label),
        rank_pattern=_pattern(settings.get("rank_pattern"), "rank_pattern", label, is_rank=True),
        alpha_pattern=_pattern(settings.get("alpha_pattern"), "alpha_pattern", label, is_rank=False),
    )


def _names(value, key: str, label: str, required: bool = False) -> tuple[str, ...] | str:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise AdapterError(f"{label}: {key} {value!r} is not a regular expression ({exc})") from None
        return value
    if value is None and required:
        raise AdapterError(f"{label}: {CONFIG_FILE} names no target_modules; give the modules the LoRA is on")
    return _strings(value, key, label)


def _strings(value, key: str, label: str) -> tuple[str, ...]:
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{label}: {key} is {value!r}; give module names")
    return tuple(value)


def _layers(value, label: str) -> tuple[int, ...]:
    value = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise AdapterError(f"{label}: layers_to_transform is {value!r}; give layer indices")
    return tuple(value)


def _pattern(value, key: str, label: str, is_rank: bool) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise AdapterError(f"{label}: {key} is {value!r}; give a mapping of module patterns to values")
    for pattern, v in value.items():
        good = (isinstance(v, int) and v >= 1) if is_rank else (isinstance(v, (int, float)) and math.isfinite(v))
        if isinstance(v, bool) or not good:
            raise AdapterError(f"{label}: {key}[{pattern!r}] is {v!r}; give " +
                               ("a rank >= 1" if is_rank else "a finite number"))
    return tuple(value.items())


def _matches(names: tuple[str, ...] | str, key: str) -> bool:
    """PEFT's rule: a regex must match the whole name; a list matches a name equal to one entry or ending in
    ".<entry>"."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(key: str, patterns: tuple[str, ...]) -> int | None:
    """The layer index in a module's name as PEFT finds it: the first numbered segment (after one of `patterns`)."""
    regexes = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        match = re.match(regex, key)
        if match is not None:
            return int(match.group("idx"))
    return None


def _pattern_value(pattern: tuple, key: str, default):
    """PEFT's get_pattern_key: the first pattern that ends the name (as a regex), else the default."""
    for regex, value in pattern:
        if re.match(rf"(.*\.)?({regex})$", key):
            return value
    return default


def weight_module(key: str) -> tuple[str, str] | None:
    """(module name, "A" or "B") of a LoRA weight's key in an adapter file; None for any other key."""
    match = _WEIGHT_KEY.fullmatch(key)
    return None if match is None else (match.group("module"), match.group("part"))


def adapters_digest(adapters: dict[str, str]) -> dict[str, str]:
    """Each adapter by the content of its config and weight file (what an output made with it depends on)."""
    digests = {}
    for name in adapter_names(adapters):
        adapter = read_adapter(name, adapters[name])
        digest = hashlib.sha256()
        for path in (Path(adapter.directory) / CONFIG_FILE, Path(adapter.weights)):
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        digests[name] = digest.hexdigest()[:16]
    return digests
