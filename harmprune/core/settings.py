"""Dataclass settings that double as CLI arguments (litgpt style).

Each field's one-line doc lives in ``field(metadata={"help": ...})``; ``add_arguments`` turns a
dataclass into argparse options and ``from_namespace`` builds the validated dataclass back.
Validation lives in each dataclass's ``__post_init__`` and raises HarmpruneError.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from typing import Any

from .errors import HarmpruneError


def opt(default: Any = dataclasses.MISSING, help: str = "", choices=None, deprecated: tuple[str, ...] = (),
        range: str | None = None, role: str | None = None, **kw) -> Any:
    """A dataclass field with a one-line help text (and optional choices) for the CLI.

    ``deprecated``: old flag names that keep working for one release, with a one-line notice.
    ``range``: the values a numeric field (or each item of a numeric list) may take, declared once with
    the flag and checked by :func:`check_values` before any work: ``">= 1"``, ``"> 0"``, ``"[0, 1]"``,
    ``"(0, 1]"``, ``"[0, 1)"`` or ``"finite"``; every numeric value must be finite.
    ``role``: ``"input"`` (a path the command reads: a checkpoint, data file, score directory) or
    ``"output"`` (a path it writes): :func:`check_paths` keeps outputs off inputs.
    """
    if range is not None:
        parse_range(range)  # a typo in a declaration fails at import
    assert role in (None, "input", "output"), role
    meta = {"help": help, "choices": choices, "deprecated": tuple(deprecated), "range": range, "role": role}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return list, typing.get_args(tp)[0] if typing.get_args(tp) else str
    return tp, None


class _DeprecatedFlag(argparse.Action):
    """An old flag name: stores into the new field and says once, in one line, what to use instead."""

    def __init__(self, *args, new: str, **kw):
        self.new = new
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"harmprune: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def declared_in(cls, name: str) -> type:
    """The class of ``cls``'s MRO that declares field ``name`` (its option group)."""
    for c in cls.__mro__:
        if name in c.__dict__.get("__annotations__", {}):
            return c
    return cls


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), deprecated: bool = True) -> None:
    """Add one option per dataclass field (except ``skip``); fields without a default become required options.

    ``deprecated``: also add the fields' old flag names (call :func:`add_deprecated` after every class
    of a command instead, so an old name never shadows a current flag of another class).
    """
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls, skip):
        tp, inner = _base_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = f.default if not required else False
        elif tp is list:
            kw["nargs"] = "+"
            kw["type"] = inner
            # a list field may default to a list (default_factory) or to None ("not given")
            has_factory = f.default_factory is not dataclasses.MISSING
            kw["default"] = None if required else (f.default_factory() if has_factory else f.default)
        else:
            kw["type"] = tp
            kw["default"] = None if required else f.default
        if required and not f.metadata.get("deprecated"):  # an old name may supply it: the class checks
            kw["required"] = True
        elif tp is not bool:
            kw["help"] += f" (default: {kw['default']})"
        action = parser.add_argument(_flag(f.name), **kw)
        action.harmprune_origin = f"{declared_in(cls, f.name).__qualname__}.{f.name}"  # for tests/test_flags.py
    if deprecated:
        add_deprecated(parser, cls, skip)


def add_deprecated(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """The old flag names of ``cls``'s fields, each storing into its field with a one-line notice; an
    old name that is a current flag of this parser (it means something else now) is left out."""
    for f in _cli_fields(cls, skip):
        new = parser._option_string_actions.get(_flag(f.name))
        for old in f.metadata.get("deprecated", ()):
            if old in parser._option_string_actions or new is None:
                continue
            extra = {k: getattr(new, k) for k in ("type", "nargs", "choices") if getattr(new, k) is not None}
            parser.add_argument(old, dest=f.name, action=_DeprecatedFlag, new=_flag(f.name), help=argparse.SUPPRESS,
                                default=argparse.SUPPRESS, **extra)


def _cli_fields(cls, skip):
    return [f for f in dataclasses.fields(cls) if not (f.name.startswith("_") or not f.init or f.name in skip)]


def from_namespace(cls, ns: argparse.Namespace):
    """Build the dataclass from parsed arguments: the declared ranges first (:func:`check_values`),
    then the class's own validation."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(ns).items() if k in names}
    check_values(cls, values)
    return cls(**values)


# ---------------------------------------------------------------- declared ranges


_RANGE = re.compile(r"^\s*(?:(?P<op>>=|>|<=|<)\s*(?P<bound>\S+)|(?P<lo_b>[\[(])\s*(?P<lo>[^,]+),\s*(?P<hi>[^\])]+)"
                    r"(?P<hi_b>[\])])|(?P<finite>finite))\s*$")


def parse_range(spec: str) -> tuple[float, bool, float, bool]:
    """``(lo, lo_inclusive, hi, hi_inclusive)`` of a range declaration (see :func:`opt`)."""
    m = _RANGE.match(spec)
    if not m:
        raise ValueError(f"bad range declaration {spec!r}")
    inf = float("inf")
    if m["finite"]:
        return -inf, False, inf, False
    if m["op"]:
        b = float(m["bound"])
        return {">=": (b, True, inf, False), ">": (b, False, inf, False),
                "<=": (-inf, False, b, True), "<": (-inf, False, b, False)}[m["op"]]
    return float(m["lo"]), m["lo_b"] == "[", float(m["hi"]), m["hi_b"] == "]"


def in_range(value: float, spec: str) -> bool:
    lo, lo_in, hi, hi_in = parse_range(spec)
    return (value > lo or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def numeric_fields(cls) -> dict[str, tuple[type, str | None]]:
    """``{field: (int or float, declared range)}`` of every numeric (or numeric-list) CLI field of ``cls``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in _cli_fields(cls, ()):
        tp, inner = _base_type(hints[f.name])
        kind = inner if tp is list else tp
        if kind in (int, float):
            out[f.name] = (kind, f.metadata.get("range"))
    return out


def check_values(cls, values: dict) -> None:
    """Every numeric value of ``values`` (fields of ``cls``; list items one by one) is finite and inside
    its field's declared range: one line naming the flag, the range and the value."""
    for name, (_, spec) in numeric_fields(cls).items():
        value = values.get(name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is None or isinstance(v, bool):
                continue
            if not math.isfinite(v):
                raise HarmpruneError(f"{_flag(name)} must be a finite number, got {v}")
            if spec and spec != "finite" and not in_range(v, spec):
                where = f"in {spec}" if spec[0] in "[(" else spec
                raise HarmpruneError(f"{_flag(name)} must be {where}, got {v:g}" if isinstance(v, float)
                                     else f"{_flag(name)} must be {where}, got {v}")


def path_fields(cls) -> dict[str, str]:
    """``{field: role}`` of the fields of ``cls`` declared as input or output paths."""
    return {f.name: f.metadata["role"] for f in _cli_fields(cls, ()) if f.metadata.get("role")}


def to_dict(cfg) -> dict:
    """The resolved settings as JSON-ready data."""
    return dataclasses.asdict(cfg)


def check(cond: bool, msg: str) -> None:
    """Validation helper for __post_init__: raise a one-line HarmpruneError when cond is false."""
    if not cond:
        raise HarmpruneError(msg)


def check_min(cfg, minimum: float, *names: str) -> None:
    """Validation helper: each named field of ``cfg`` is None (not given) or at least ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        check(value is None or value >= minimum, f"{_flag(name)} must be >= {minimum:g}, got {value}")
