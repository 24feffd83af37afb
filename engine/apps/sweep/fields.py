"""SweepError and the typed readers of a sweep file's fields; each error names the field's path."""

from __future__ import annotations

import json
import math
import re

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
NAME_RULE = "letters, digits and _ . + - only"


class SweepError(ValueError):
    """The sweep file or its output directory cannot be used; the message names the field or file and the fix."""


def preview(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:56] + " ..."


def check_keys(table: dict, keys, where: str) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise SweepError(f"unknown key(s) {unknown} in {where}; known: {', '.join(keys)}")


def need(table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise SweepError(f"{where} is missing")
    value = table[key]
    if not isinstance(value, kind):
        raise SweepError(f"{where} must be a {'table' if kind is dict else kind.__name__}, got {preview(value)}")
    return value


def list_field(value, where: str) -> list:
    if not isinstance(value, list):
        raise SweepError(f"{where} must be a list, got {preview(value)}")
    return value


def int_field(value, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{where} must be an integer, got {preview(value)}")
    if minimum is not None and value < minimum:
        raise SweepError(f"{where} is {value}; it must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SweepError(f"{where} is {preview(value)}; it must be at most {maximum:,}")
    return value


def number_field(value, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where} must be a number, got {preview(value)}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float64
        raise SweepError(f"{where} is an integer of {len(str(abs(value)))} digits, beyond the range of a number; "
                         f"give a finite number") from None
    if not math.isfinite(number):
        raise SweepError(f"{where} is {preview(value)}; give a finite number")
    if minimum is not None and number < minimum:
        raise SweepError(f"{where} is {number}; it must be at least {minimum}")
    return number


def bool_field(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"{where} must be true or false, got {preview(value)}")
    return value


def str_field(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SweepError(f"{where} must be a non-empty string, got {preview(value)}")
    return value


def name_field(value, where: str) -> str:
    if not NAME_PATTERN.match(str_field(value, where)):
        raise SweepError(f"{where} is {value!r}; names go into request ids: use {NAME_RULE}")
    return value


def _typed(value, kind: type, where: str):
    readers = {int: int_field, float: number_field, bool: bool_field, str: str_field, list: list_field}
    return readers[kind](value, where)


def section(table, keys: dict, where: str) -> dict:
    if not isinstance(table, dict):
        raise SweepError(f"{where} must be a table, got {preview(table)}")
    check_keys(table, keys, f"[{where}]")
    return {key: _typed(value, keys[key], f"{where}.{key}") for key, value in table.items()}


def entries(items: list, name: str, key: str, keys: tuple, example: str, hint: str):
    """(where, table) for each entry of a list whose entries are a `key` string or a table of `keys`."""
    if not items:
        raise SweepError(f"{name} is empty; {hint}")
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, str):
            item = {key: item}
        if not isinstance(item, dict):
            raise SweepError(f"{where} must be a {example}, got {preview(item)}")
        check_keys(item, keys, where)
        yield where, item
