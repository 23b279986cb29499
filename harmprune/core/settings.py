"""Dataclass settings that double as CLI arguments (litgpt style).

Each field's one-line doc lives in ``field(metadata={"help": ...})``; ``add_arguments`` turns a
dataclass into argparse options and ``from_namespace`` builds the validated dataclass back.
Validation lives in each dataclass's ``__post_init__`` and raises HarmpruneError.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from .errors import HarmpruneError


def opt(default: Any = dataclasses.MISSING, help: str = "", choices=None, **kw) -> Any:
    """A dataclass field with a one-line help text (and optional choices) for the CLI."""
    meta = {"help": help, "choices": choices}
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


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per dataclass field; fields without a default become required options."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.init:
            continue
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
        if required:
            kw["required"] = True
        elif tp is not bool:
            kw["help"] += f" (default: {kw['default']})"
        parser.add_argument(_flag(f.name), **kw)


def from_namespace(cls, ns: argparse.Namespace):
    """Build the dataclass from parsed arguments (runs its validation)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(cfg) -> dict:
    """The resolved settings as JSON-ready data."""
    return dataclasses.asdict(cfg)


def check(cond: bool, msg: str) -> None:
    """Validation helper for __post_init__: raise a one-line HarmpruneError when cond is false."""
    if not cond:
        raise HarmpruneError(msg)
