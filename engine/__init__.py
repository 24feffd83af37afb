"""A steerable batch-generation engine for LLM research.

The public names are loaded on first use (PEP 562), so `import engine` imports neither torch nor the pipeline:
the spawned tokenizer and decoder workers import engine.* modules and must stay light (DESIGN.md, "Start-up is
part of the job").
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "CaptureDefaults": "engine.config",
    "EngineConfig": "engine.config",
    "SamplingDefaults": "engine.config",
    "SteeringDefaults": "engine.config",
    "Engine": "engine.engine",
    "EngineError": "engine.engine",
}

__all__ = ["CaptureDefaults", "Engine", "EngineConfig", "EngineError", "SamplingDefaults", "SteeringDefaults"]


def __getattr__(name: str):
    """Import a public name's module when the name is first asked for, and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
