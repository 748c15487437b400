"""Config dataclasses from mappings (YAML sections, JSON objects): each value checked against its
field's type, an unknown key or a wrong type named with its section."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(section: str, key: str, annotation: str, value: Any) -> Any:
    """Check a value against its field's annotation ("float", "int | None", ...).

    A number written as text ("1e-3", which YAML reads as a string) is read as a number; an int
    field takes a float only when it is an exact integer (1e3 -> 1000, 1.5 is an error); a NaN
    is refused for every field.
    """
    allowed = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in allowed:
        return None
    if isinstance(value, str) and ("float" in allowed or "int" in allowed) and \
            _NUMBER.fullmatch(value):
        value = float(value)
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{section}.{key} must be {annotation}, not NaN")
    if isinstance(value, float) and "int" in allowed and "float" not in allowed:
        if not value.is_integer():
            raise ValueError(f"{section}.{key} must be {annotation} (a whole number), "
                             f"got {value!r}")
        value = int(value)
    for name in allowed:
        kind = _TYPES.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is not None and isinstance(value, kind) and not (
                kind is int and isinstance(value, bool)):
            return value
    raise ValueError(f"{section}.{key} must be {annotation}, got {value!r}")


def section_from_mapping(kind: type, name: str, values: Mapping[str, Any]):
    """`kind(**values)` for a config dataclass, each value checked against its field's type;
    an unknown key or a wrong type is a ValueError naming `name`.key and the valid keys."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
    fields = {f.name: f.type for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section {name!r}; valid keys: {sorted(fields)}"
        )
    return kind(**{key: _coerce(name, key, str(fields[key]), value)
                   for key, value in values.items()})
