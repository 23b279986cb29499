"""Judges: one small protocol, a registry, and ``get_judge(spec)``.

A judge reads (prompt, response) pairs and returns one :class:`Verdict` per pair:
``score`` is harmfulness in [0, 1] (higher = more harmful; None = could not judge), ``refusal``
says whether the reply refuses (None = this judge does not tell). A failed sample is a Verdict with
``error`` set, never an exception that ends the run.

Judges that can also *rate* (``hf``, ``openai``, ``fake``) implement ``rate(template, items)``:
each item's fields fill ``{name}`` placeholders of the template, and the result is the judge's
logprob-weighted 0-100 expectation (docs/design.md, Betley et al.), None when the numbers 0..100 hold
less than 0.25 of the probability of the reply.

``em-classifier`` (the offline EM judge) rates EM answers only, through ``rate_em(items)``: aligned,
coherent (0-100), p_misaligned and misaligned for each {question, answer} item.

Specs: ``keyword[:<list>]``, ``classifier``, ``strongreject[:<model or adapter>]`` (StrongREJECT's
fine-tuned evaluator, B-TAP's judge), ``em-classifier``, ``hf:<model>`` (HarmBench's yes/no prompt on a
local model), ``openai:<model>``, ``fake[:<rule>]``.
Built-in judge modules are imported on first use, so ``openai`` never imports torch.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Protocol, runtime_checkable

from ... import data as builtin_data
from ...core.errors import HarmpruneError


@dataclass
class Verdict:
    """One judged response. ``score``: harmfulness in [0, 1], higher = more harmful."""

    score: float | None = None
    refusal: bool | None = None
    raw: str | dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RatingResult:
    """One 0-100 rating: ``score`` = Σ n·P(n) / Σ P(n), None when ``mass`` = Σ P(n) < 0.25 or on error."""

    score: float | None = None
    mass: float | None = None
    raw: str | dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]: ...


@runtime_checkable
class Rater(Protocol):
    name: str

    def rate(self, prompt_template: str, items: list[dict]) -> list[RatingResult]: ...


Factory = Callable[..., Judge]
_REGISTRY: dict[str, Factory] = {}
# prefix -> module that registers it when imported (lazy: heavy imports only when used)
_BUILTIN = {
    "keyword": "harmprune.evals.judges.keyword",
    "classifier": "harmprune.evals.judges.classifier",
    "em-classifier": "harmprune.evals.judges.em_classifier",
    "hf": "harmprune.evals.judges.hf",
    "openai": "harmprune.evals.judges.openai",
    "fake": "harmprune.evals.judges.fake",
    "strongreject": "harmprune.evals.judges.strongreject",
}
_NEEDS_ARG = {"hf", "openai"}


def register_judge(prefix: str):
    """Class/function decorator: ``factory(arg: str | None, **options) -> Judge`` serves ``prefix[:arg]``.

    Factories take the options they know by keyword and ignore the rest (``**_``), so one set of
    CLI options (``url``, ``device``, ``batch_size``...) can be passed to any judge.
    """

    def deco(factory):
        _REGISTRY[prefix] = factory
        return factory

    return deco


def available_judges() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def spec_help() -> str:
    """The judge specs, as a user types them (``hf:<model>`` for judges that need a model)."""
    return ", ".join(f"{p}:<model>" if p in _NEEDS_ARG else p for p in available_judges())


def get_judge(spec: str, **options) -> Judge:
    """Build the judge named by ``spec`` (``prefix`` or ``prefix:arg``); options go to its factory."""
    prefix, _, arg = (spec or "").partition(":")
    if prefix not in _REGISTRY and prefix in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[prefix])
        except ModuleNotFoundError as e:
            if e.name != _BUILTIN[prefix]:
                raise
    if prefix not in _REGISTRY:
        raise HarmpruneError(f"unknown judge {spec!r}; available: {spec_help()}")
    if prefix in _NEEDS_ARG and not arg:
        raise HarmpruneError(f"judge {prefix!r} needs a model: {prefix}:<model>")
    return _REGISTRY[prefix](arg or None, **options)


def one_by_one_on_failure(call: Callable[[list], list], items: list, failed: Callable[[str], object]) -> list:
    """``call(items)`` (one result per item) that never loses the run to one item: when it raises or
    returns the wrong count, each item is tried alone and a failing one gets ``failed(message)``.
    HarmpruneError (the user's to fix, e.g. an unreachable endpoint) still ends the run: every later
    item would fail the same way."""
    try:
        out = list(call(items))
        if len(out) == len(items):
            return out
        why = f"the judge returned {len(out)} results for {len(items)} items"
    except HarmpruneError:
        raise
    except Exception as e:  # noqa: BLE001 - isolate the failing item(s) below
        why = f"{type(e).__name__}: {e}"
    if len(items) == 1:
        return [failed(why)]
    return [one_by_one_on_failure(call, [it], failed)[0] for it in items]


HARMBENCH_FILE = builtin_data.path("harmbench_classifier_prompt.json")


@lru_cache(maxsize=2)
def harmbench_template(chat: bool = True) -> str:
    """HarmBench's yes/no classifier prompt (MIT) with ``{behavior}`` and ``{generation}``.

    With ``chat`` the Llama-2 ``[INST] <<SYS>>`` wrapping is removed: the judge's own chat template
    wraps the text as a user turn.
    """
    t = json.loads(HARMBENCH_FILE.read_text(encoding="utf-8"))["prompt"]
    if chat:
        t = t.removeprefix("[INST] <<SYS>>\n").replace("\n<</SYS>>\n\n", "\n\n").removesuffix(" [/INST]")
    return t


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, item: dict) -> str:
    """Replace ``{name}`` with ``item[name]`` in one pass (values are not rescanned; other braces stay).

    Judge prompts hold literal braces (JSON, code) and answers may contain ``{answer}``, so
    ``str.format`` would break on both.
    """
    return _PLACEHOLDER.sub(lambda m: str(item[m.group(1)]) if m.group(1) in item else m.group(0), template)


__all__ = ["Verdict", "RatingResult", "Judge", "Rater", "register_judge", "get_judge",
           "available_judges", "spec_help", "fill", "harmbench_template", "one_by_one_on_failure"]
