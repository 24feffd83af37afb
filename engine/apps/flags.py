"""The engine's command-line flags and settings-file keys, generated from EngineConfig's fields.

Each field of EngineConfig (and of its SamplingDefaults, SteeringDefaults and CaptureDefaults groups) says in
engine/config.py whether it is a flag (`knob`, with its help text and argparse facts), a setting with no flag
(`no_flag`) or a group of flags (`flag_group`). Here: add_engine_args puts those flags on a parser, config_from_args
builds the EngineConfig back from the parsed flags, and engine_keys names the fields a settings file may set.
"""

from __future__ import annotations

import argparse
import dataclasses

from engine.config import EngineConfig

# A flag's type from its field's annotation (the annotations are strings: `from __future__ import annotations`).
FLAG_TYPES = {"int": int, "int | None": int, "float": float}
# The type a settings file (TOML or JSON) gives a field, from its annotation.
FILE_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float, "bool": bool,
              "list[str]": list}


def kind(f: dataclasses.Field) -> str:
    """flag, setting (no flag) or group; a field declared without knob / no_flag / flag_group is a mistake."""
    try:
        return f.metadata["kind"]
    except KeyError:
        raise TypeError(f"config field {f.name!r} is declared with none of knob, no_flag or flag_group; declare it "
                        f"with one of them (engine/config.py)") from None


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are flags, in field order."""
    return [f for f in dataclasses.fields(cls) if kind(f) == "flag"]


def flag_name(f: dataclasses.Field) -> str:
    """--steer-layer: the flag's own name, else --<field name with dashes>."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def dest(f: dataclasses.Field) -> str:
    """Where argparse puts the flag's value: its name without dashes (steer_layer)."""
    return flag_name(f)[2:].replace("-", "_")


def argparse_kwargs(f: dataclasses.Field) -> dict:
    """add_argument's keywords for a flag field: its own, then the action, type and default its field implies."""
    kwargs = dict(f.metadata["argparse"])
    if f.type == "bool":
        kwargs.setdefault("action", "store_true")
    elif "action" not in kwargs and f.type in FLAG_TYPES:
        kwargs.setdefault("type", FLAG_TYPES[f.type])
    if "default" not in kwargs:
        kwargs["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return kwargs


def add_engine_flag(parser, name: str) -> None:
    """The flag of EngineConfig field `name` on `parser` (an ArgumentParser or an argument group)."""
    f = _field(EngineConfig, name)
    if kind(f) != "flag":
        raise ValueError(f"EngineConfig.{name} is not a flag; use one of {', '.join(x.name for x in top_flags())}")
    parser.add_argument(flag_name(f), **argparse_kwargs(f))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine: EngineConfig's own flags (in field order, a field with
    `after` moved behind that one), then one argument group per group field, its dataclass's flags followed by the
    flags that name it as their `group`. Flags with is_shared False are left to each command (add_engine_flag)."""
    shared = [f for f in top_flags() if f.metadata["is_shared"]]
    for f in _in_flag_order([f for f in shared if f.metadata["group"] is None]):
        parser.add_argument(flag_name(f), **argparse_kwargs(f))
    for box in _groups():
        group = parser.add_argument_group(box.metadata["title"])
        for f in flag_fields(box.default_factory) + [f for f in shared if f.metadata["group"] == box.name]:
            group.add_argument(flag_name(f), **argparse_kwargs(f))


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed flags: each flag field from its flag, each group from its dataclass's flags. A
    flag a command may leave out (is_shared False, e.g. --return-tokens) keeps its field's default when absent;
    fields with no flag keep theirs. ConfigError names a bad value."""
    values = {}
    for f in dataclasses.fields(EngineConfig):
        if kind(f) == "group":
            cls = f.default_factory
            values[f.name] = cls(**{g.name: getattr(args, dest(g)) for g in flag_fields(cls)})
        elif kind(f) == "flag" and (f.metadata["is_shared"] or hasattr(args, dest(f))):
            values[f.name] = getattr(args, dest(f))
    return EngineConfig(**values)


def engine_keys(exclude: tuple[str, ...] = ()) -> dict[str, type]:
    """EngineConfig's own flag fields (not those of its generation, steering and capture groups), less `exclude`,
    each with the type a settings file gives it (str, int, float, bool or list), in field order."""
    return {f.name: _file_type(f) for f in top_flags() if f.name not in exclude}


def top_flags() -> list[dataclasses.Field]:
    """EngineConfig's own flag fields, in field order."""
    return flag_fields(EngineConfig)


def _file_type(f: dataclasses.Field) -> type:
    try:
        return FILE_TYPES[f.type]
    except KeyError:
        raise TypeError(f"EngineConfig.{f.name}: a settings file has no type for its annotation {f.type!r}; add it "
                        f"to FILE_TYPES (engine/apps/flags.py)") from None


def _groups() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if kind(f) == "group"]


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def _in_flag_order(fields: list[dataclasses.Field]) -> list[dataclasses.Field]:
    """Field order, except that a field with `after` comes right behind the field it names."""
    order = [f for f in fields if f.metadata["after"] is None]
    for f in fields:
        if f.metadata["after"] is not None:
            names = [g.name for g in order]
            order.insert(names.index(f.metadata["after"]) + 1, f)
    return order
