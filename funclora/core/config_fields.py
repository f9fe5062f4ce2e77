"""Checks and conversions of single ``LoraConfig`` field values (each error names the field)."""

from __future__ import annotations

import dataclasses
import re

__all__ = ["jsonable", "is_number", "is_index", "check_regex", "name_list", "names_or_regex"]


def jsonable(value):
    """``value`` as JSON can hold it: sets and tuples as lists, dataclasses as dicts."""
    if isinstance(value, (set, tuple)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_regex(field_name: str, what: str, pattern: str) -> None:
    """Raise a ValueError naming ``field_name`` if ``pattern`` (built from ``what``) is no regex."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig: `{field_name}` entry {what!r} is not a valid regular expression "
                         f"({e}); escape special characters with re.escape.") from None


def name_list(field_name: str, value) -> list[str]:
    try:
        names = list(dict.fromkeys(value))
    except TypeError:
        raise TypeError(f"LoraConfig: `{field_name}` must be a list of strings, got {value!r}.") from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"LoraConfig: `{field_name}` must hold strings, found {name!r}.")
    return names


def names_or_regex(field_name: str, value):
    if value is None or isinstance(value, str):
        return value
    return name_list(field_name, value)
