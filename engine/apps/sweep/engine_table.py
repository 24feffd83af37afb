"""A sweep file's [engine] table: which EngineConfig fields it may set (the same fields the flags come from), and
their checks."""

from __future__ import annotations

import dataclasses

from engine.apps.flags import engine_keys
from engine.apps.sweep.fields import SweepError, section, str_field
from engine.config import DTYPES, TRUNCATE_MODES, ConfigError, EngineConfig, device_settings

# EngineConfig's flags a sweep file sets elsewhere, so [engine] refuses them: the model and its tokenizer per [models]
# entry, steering through [vectors] and [grid].
SET_ELSEWHERE = ("model", "tokenizer", "steering_specs", "adapters")
# EngineConfig fields a sweep file may set under [engine], with their types: every engine flag but those.
ENGINE_KEYS = engine_keys(exclude=SET_ELSEWHERE)
# Of those, the ones that change what a record is (part of the config hash); the rest only change speed.
ENGINE_MEANING = ("dtype", "max_model_len", "truncate")
ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


def engine_settings(table, devices_name: str = "engine.devices") -> dict:
    values = section(table, ENGINE_KEYS, "engine")
    if "devices" in values:
        values["devices"] = [str_field(d, f"{devices_name}[{i}]") for i, d in enumerate(values["devices"])]
        for i, device in enumerate(values["devices"]):
            try:
                EngineConfig(**device_settings(device))
            except ConfigError as exc:
                raise SweepError(f"{devices_name}[{i}] is {device!r} ({exc}); use cpu, cuda or cuda:N, or GPUs that "
                                 f"run one model together: \"0,1\" or \"all\"") from None
    if values.get("dtype", "auto") not in DTYPES:
        raise SweepError(f"engine.dtype is {values['dtype']!r}; use one of {', '.join(DTYPES)}")
    if values.get("truncate", "none") not in TRUNCATE_MODES:
        raise SweepError(f"engine.truncate is {values['truncate']!r}; use one of {', '.join(TRUNCATE_MODES)}")
    try:
        EngineConfig(**{k: v for k, v in values.items() if k != "devices"})
    except ConfigError as exc:
        raise SweepError(f"engine: {exc}") from None
    return values
