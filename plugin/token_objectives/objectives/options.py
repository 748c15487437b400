"""Option declarations and the one checker that every config surface goes through.

A config is a frozen dataclass whose fields are declared with `option(default, help=...,
choices=..., low=..., high=..., open=...)`; the annotation gives the type. From those
declarations alone come:
- `check(config, section)`, called by each config's __post_init__: every value's type, range
  and choices (ObjectiveConfig, ScheduledSamplingConfig, the sections of training.config, the
  ds_config section);
- `from_mapping(kind, values, section)`: the YAML run-config sections (training.config), the
  ds_config "token_objectives" section (integrations.deepspeed.section) and HF's options
  mapping (integrations.hf): an unknown key lists the valid ones;
- `read_flag(option, text)`: the values of the Megatron-LM flags (integrations.megatron.hook);
- `Option.accepts`: the "what it takes" of every message and of the flags' help.

One message for a bad value, on every surface:  `section.key: expected <accepts>, got <value!r>`
(the key alone without a section; the flag on the command line). One message for an unknown key:
`unknown key(s) [...] in config section 'section'; valid keys: [...]`.

Off is None, everywhere: every option whose type allows None is off with None (YAML and JSON
`null`, Python None); on the Megatron-LM command line the word `none` is that None. A number is
finite (a NaN or an infinity is refused), an int is not a bool, an int is a float. Text read from
YAML or a command line (`text=True`) may spell a number ("1e-3", which YAML reads as a string),
and an int option takes a float that is an exact integer there (`--set train.steps=1e3`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

__all__ = ["Option", "check", "from_mapping", "option", "options_of", "read_flag", "refusal"]

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_OPEN_ENDS = ("", "low", "high", "both")
_WORDS = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def option(default: Any = dataclasses.MISSING, *, help: str = "", choices: tuple = (),
           low: float | None = None, high: float | None = None, open: str = "",
           accepts: str = "", off_help: str = "",
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field declared for the checker: its help, its choices (the strings it takes),
    its range low..high (`open`: "low", "high" or "both" ends left out) in `field.metadata`.

    accepts: what it takes, in words, where the words made from the type, the choices and the
    range would not say it. off_help: for a bool that is on by default, what turning it off does
    (the help of a Megatron-LM --...-no-... flag)."""
    if open not in _OPEN_ENDS:
        raise ValueError(f"open: expected one of {_OPEN_ENDS}, got {open!r}")
    metadata = {"help": help, "choices": tuple(choices), "low": low, "high": high,
                "open": open}
    if accepts:
        metadata["accepts"] = accepts
    if off_help:
        metadata["off_help"] = off_help
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Option:
    """One declared option: its name, the types it takes (of bool, int, float, str; None when
    `optional`), its default, help, choices and range."""

    name: str
    kinds: tuple[type, ...]
    optional: bool = False
    default: Any = None
    help: str = ""
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open: str = ""
    off_help: str = ""
    words: str = ""  # an `accepts` given by hand

    @classmethod
    def of(cls, field: dataclasses.Field, hint: Any) -> Option:
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                     type(int | None)) \
            else (hint,)
        meta = field.metadata
        return cls(
            name=field.name,
            kinds=tuple(typing.get_origin(kind) or kind for kind in kinds
                        if kind is not type(None)),
            optional=type(None) in kinds,
            default=field.default,
            help=meta.get("help", ""),
            choices=meta.get("choices", ()),
            low=meta.get("low"),
            high=meta.get("high"),
            open=meta.get("open", ""),
            off_help=meta.get("off_help", ""),
            words=meta.get("accepts", ""),
        )

    def field(self) -> Any:
        """This option as a dataclass field of another config (the same declaration)."""
        return option(self.default, help=self.help, choices=self.choices, low=self.low,
                      high=self.high, open=self.open, accepts=self.words,
                      off_help=self.off_help)

    @property
    def accepts(self) -> str:
        """What the option takes, in words: "a number >= 0", "one of 'was', 'mse', or None"."""
        if self.words:
            return self.words
        parts = []
        if self.choices:
            quoted = ", ".join(repr(choice) for choice in self.choices)
            parts.append(quoted if len(self.choices) == 1 else f"one of {quoted}")
        for kind in (bool, int, float, str, dict):
            if kind in self.kinds and not (kind is str and self.choices) \
                    and not (kind is int and float in self.kinds):
                parts.append(_WORDS.get(kind, "a mapping") + self._range())
        text = " or ".join(parts)
        return f"{text}, or None" if self.optional else text

    def _range(self) -> str:
        low, high, open = self.low, self.high, self.open
        if low is not None and high is not None:
            left = "(" if open in ("low", "both") else "["
            right = ")" if open in ("high", "both") else "]"
            return f" in {left}{_number(low)}, {_number(high)}{right}"
        if low is not None:
            return f" {'>' if open in ('low', 'both') else '>='} {_number(low)}"
        if high is not None:
            return f" {'<' if open in ('high', 'both') else '<='} {_number(high)}"
        return ""

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open in ("low", "both")
                                     else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open in ("high", "both")
                                     else value <= self.high)

    def checked(self, value: Any, where: str | None = None, text: bool = False) -> Any:
        """`value` as this option holds it (an int for an int, a float for a number), or a
        ValueError `where: expected <accepts>, got <value!r>` (where: default the name).

        text: `value` comes from YAML or a command line, where "1e-3" is a number and an int
        option takes an exact integer written as a float."""
        where = self.name if where is None else where
        if value is None:
            if self.optional:
                return None
            raise refusal(where, self.accepts, value)
        numeric = int in self.kinds or float in self.kinds
        if text and isinstance(value, str) and numeric and value not in self.choices \
                and _NUMBER.fullmatch(value):
            # The number the text spells is what a message shows: "-1" as -1, as YAML reads it.
            value = int(value) if _INTEGER.fullmatch(value) else float(value)
        taken = self._taken(value, text)
        if taken is _REFUSED:
            finite = not isinstance(value, Real) or isinstance(value, bool) or math.isfinite(value)
            raise refusal(where, self.accepts, value, "" if finite else " (not a finite number)")
        return taken

    def _taken(self, value: Any, text: bool) -> Any:
        """`value` as the option holds it, or _REFUSED."""
        if text and isinstance(value, float) and int in self.kinds and float not in self.kinds \
                and value.is_integer():
            value = int(value)
        if isinstance(value, bool):
            return value if bool in self.kinds else _REFUSED
        if isinstance(value, Real) and (float in self.kinds or (
                int in self.kinds and isinstance(value, Integral))):
            if not math.isfinite(value):
                return _REFUSED
            value = float(value) if float in self.kinds else int(value)
            return value if self._in_range(value) else _REFUSED
        if isinstance(value, str) and str in self.kinds:
            return value if not self.choices or value in self.choices else _REFUSED
        if any(kind not in _WORDS and isinstance(value, kind) for kind in self.kinds):
            return value
        return _REFUSED


_REFUSED = object()


def refusal(where: str, accepts: str, value: Any, why: str = "") -> ValueError:
    """The one message for a bad value: `where: expected <accepts>, got <value!r>` (without
    `where: ` when where is empty: argparse puts the flag in front itself)."""
    prefix = f"{where}: " if where else ""
    return ValueError(f"{prefix}expected {accepts}, got {value!r}{why}")


@functools.cache
def options_of(kind: type) -> dict[str, Option]:
    """The declared options of a config dataclass, by field name."""
    hints = typing.get_type_hints(kind)
    return {field.name: Option.of(field, hints[field.name])
            for field in dataclasses.fields(kind)}


def _where(section: str | None, name: str) -> str:
    return f"{section}.{name}" if section else name


def check(config: Any, section: str | None = None) -> None:
    """Check every option of a (frozen) config dataclass and store its normalised value (a
    float for a number given as an int). For __post_init__; errors name `section.key`."""
    for name, declared in options_of(type(config)).items():
        value = declared.checked(getattr(config, name), _where(section, name))
        object.__setattr__(config, name, value)


def from_mapping(kind: type, values: Any, section: str, *, text: bool = False,
                 spelling: Mapping[str, str] | None = None):
    """`kind(**values)` for a config dataclass, each value checked by its declaration first.

    A section that is not a mapping, an unknown key (the valid ones listed) or a bad value is
    a ValueError naming `section` (or `section.key`). text: the values come from YAML (or a
    command line), see Option.checked. spelling: how the surface names a key (a flag), instead
    of `section.key`."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
    declared = options_of(kind)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section {section!r}; "
                         f"valid keys: {sorted(declared)}")
    spelling = spelling or {}
    return kind(**{key: declared[key].checked(value, spelling.get(key, _where(section, key)),
                                              text=text)
                   for key, value in values.items()})


def read_flag(declared: Option, text: str) -> Any:
    """The value of a command-line flag: `none` is None (off), a number may be written as
    text; checked as `declared` says (ValueError `expected <accepts>, got <value!r>`)."""
    return declared.checked(None if text == NONE else text, "", text=True)


# On a command line the word `none` is None: the option is off (`--ntl none`: CE only).
NONE = "none"


def flag_type(declared: Option):
    """argparse's `type` for a flag: the text read and checked by the option's declaration,
    `none` read as None; a bad value is argparse's error `argument --flag: expected <accepts>,
    got <value!r>`."""
    import argparse

    def read(text: str) -> Any:
        try:
            return read_flag(declared, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = declared.name  # argparse names a type by it
    return read


def flag_metavar(declared: Option) -> str | None:
    """argparse's `metavar` for a flag with choices: {a,b,...} (and none where it can be off)."""
    if not declared.choices or float in declared.kinds:
        return None
    return "{" + ",".join([*declared.choices, *([NONE] if declared.optional else [])]) + "}"
