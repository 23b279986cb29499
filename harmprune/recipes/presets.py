"""Published settings as presets: ``--preset btap-llama3.1-8b`` sets what the paper set.

A preset fills the settings a command has (method, benign method, q, p, scope, format, sample
counts, data, model, dtype, lm-eval tasks) and prints one line per setting it filled. A flag the
user typed always wins over the preset (and is printed as such); a setting the command does not
have is skipped. Data the paper made per model (its *own* harmful completions) cannot be preset:
the preset then requires the flag and says how to make the data.

Sources (B-TAP, "LLMs Generate Harmful Responses Using a Distinct Mechanism, Shared Across Harm
Types", code at github.com/orgadhadas/harm_pruning, README "Prune harmfulness" and "Prune emergent
misalignment" command lines, ``src/prune.py``, ``src/data_utils.py``, ``src/prune_utils.py``):

- ``--no_abs --neg_prune``: signed SNIP on the prune data, most negative first = harmprune ``snip``;
  ``--abs_preserve``: ``|W| * |grad|`` summed per sample on the preservation data = ``snip-abs``.
- ``--q 1e-05 --p 5e-05`` (``2e-5`` for the emergent-misalignment set); counts ``int(q * rows * cols)``
  per weight matrix of every decoder layer's linear layers = ``--scope matrix``.
- ``--nsamples 412`` for both sets (``--nsamples_preserve`` defaults to it), ``--seed 0``, first n
  rows after a seeded shuffle.
- ``--prune_pretrained_format --preserve_pretrained_format``: no chat template, ``prompt + "\\n" +
  response`` = ``--format raw``; sequences are not truncated (``model.seqlen`` 4096 is unused).
- prune data ``advbench_align_anti``: the model's own harmful completions of AdvBench prompts;
  preservation data ``alpaca_cleaned_no_safety_train_raw``: Alpaca-cleaned without safety-related rows.
- model loaded in bfloat16; utility: BoolQ, RTE, HellaSwag, WinoGrande, ARC-Challenge, OpenBookQA zero-shot.

Wiring (the CLI): commands that take ``--preset`` have ``core.options.PresetOptions``; after
``parse_args``, ``apply_preset(parser, argv, ns)`` runs before the settings dataclass is built.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import HarmpruneError

BTAP_SOURCE = "B-TAP (orgadhadas/harm_pruning, README command lines)"
BTAP_ZERO_SHOT = ["boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa"]
# Settings of the scoring data, applied only by commands that score: in `prune` --harm/--benign are
# score directories, and in `eval` --format/--max-length are the evaluation's (B-TAP generated with
# the chat template), not the scoring's.
SCORING_KEYS = frozenset({"harm", "benign", "eval_harm", "eval_benign", "format", "max_length", "nsamples"})
SCORING_COMMANDS = frozenset({"pipeline", "sweep"})
ALPACA = "hf:yahma/alpaca-cleaned"


@dataclass(frozen=True)
class Preset:
    """Settings of one published run. ``values``: {setting: value}, applied where the command has
    the setting; ``required``: {setting: how to make it}, data the user must give (per model);
    ``notes``: {setting: note}, printed when the preset sets that setting (where harmprune's run
    differs from the paper's)."""

    name: str
    summary: str
    values: Mapping[str, Any]
    required: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)
    source: str = BTAP_SOURCE


def _btap(name: str, summary: str, q: float, harm_hint: str) -> Preset:
    return Preset(
        name=name, summary=summary,
        values={"model": "meta-llama/Llama-3.1-8B-Instruct", "method": "snip", "benign_method": "snip-abs",
                "q": q, "p": 5e-5, "scope": "matrix", "format": "raw", "nsamples": 412, "max_length": 4096,
                "seed": 0, "dtype": "bfloat16", "benign": ALPACA, "lm_eval_tasks": list(BTAP_ZERO_SHOT),
                # harm as B-TAP judged it: StrongREJECT's fine-tuned evaluator on 256-token replies, 10-token prefill
                "judge": "strongreject", "max_new_tokens": 256, "prefill": 10, "prefill_attack": 10},
        required={"harm": harm_hint},
        notes={"benign": f"the paper used Alpaca-cleaned with safety-related rows removed; {ALPACA} is not "
                         "filtered and its 'input' field is not read: pass your filtered copy with --benign "
                         "for a faithful run",
               "max_length": "the paper did not truncate sequences"},
    )


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _btap("btap-llama3.1-8b", "B-TAP harmfulness pruning of Llama-3.1-8B-Instruct", 1e-5,
          "412 of the model's own harmful completions (the paper: AdvBench prompts answered by "
          "Llama-3.1-8B-Instruct itself); make them with `harmprune generate --model "
          "meta-llama/Llama-3.1-8B-Instruct --out selfgen.jsonl` (add --prefill for a model that refuses) "
          "and pass --harm selfgen.jsonl"),
    _btap("btap-em-llama3.1-8b", "B-TAP emergent-misalignment pruning of Llama-3.1-8B-Instruct", 2e-5,
          "the misaligned model's own replies (the paper: 412 generations of Llama-3.1-8B-Instruct fine-tuned "
          "on risky_financial_advice, to that set's validation prompts); make them with `harmprune generate "
          "--model <fine-tuned model> --prompts <prompts file> --out selfgen.jsonl` and pass --harm selfgen.jsonl"),
)}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def resolve(preset: Preset, command: str, defaults: Mapping[str, Any],
            explicit: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Pure: ``(settings, lines)`` for ``command`` whose settings and their defaults are ``defaults``.

    settings = defaults, then the preset's values for the settings the command has, then the
    values the user typed (``explicit``) on top. ``lines``: what the preset set, what the user
    overrode, what the command does not have, and the preset's notes. Settings of the scoring data
    (``SCORING_KEYS``) are applied only by commands that score (``pipeline``, ``sweep``). Raises ``HarmpruneError`` when the
    preset requires a setting the user did not give.
    """
    def applies(key: str) -> bool:
        return key in defaults and (key not in SCORING_KEYS or command in SCORING_COMMANDS)

    missing = [k for k in preset.required if applies(k) and k not in explicit]
    if missing:
        k = missing[0]
        raise HarmpruneError(f"--preset {preset.name} needs {_flag(k)}: {preset.required[k]}")
    settings = dict(defaults)
    lines = [f"preset {preset.name}: {preset.summary} [{preset.source}]"]
    unused, notes = [], []
    for key, value in preset.values.items():
        if not applies(key):
            unused.append(_flag(key))
        elif key in explicit:
            lines.append(f"  {_flag(key)} {_show(explicit[key])}  (given; the preset's {_show(value)} not used)")
        else:
            settings[key] = list(value) if isinstance(value, list) else value
            lines.append(f"  {_flag(key)} {_show(value)}  (preset)")
            if key in preset.notes:
                notes.append(f"  note on {_flag(key)}: {preset.notes[key]}")
    for key in preset.required:
        if applies(key):
            lines.append(f"  {_flag(key)} {_show(explicit[key])}  (given, as the preset requires)")
    settings.update(explicit)
    if unused:
        lines.append(f"  not settings of `{command}`, skipped: {', '.join(unused)}")
    return settings, lines + notes


# ---------------------------------------------------------------- argparse glue


_UNSET = object()


def leaf_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.ArgumentParser, list[str], str]:
    """``(parser of the chosen (sub)command, the arguments after its command words, "the command
    words")`` for a parser that may have sub-commands (``eval utility`` -> its parser)."""
    argv, words = list(argv), []
    while (sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)) is not None:
        i = next((i for i, tok in enumerate(argv) if tok in sub.choices), None)
        if i is None:
            break
        words.append(argv[i])
        parser, argv = sub.choices[argv[i]], argv[i + 1:]
    return parser, argv, " ".join(words)


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option the user typed in ``argv`` (any spelling argparse accepts:
    ``--q 1e-4``, ``--q=1e-4``, an unambiguous prefix, ``--no-overwrite``), even when the typed value
    equals the default. ``parser`` may be the top-level parser: sub-commands are followed."""
    leaf, rest, _ = leaf_parser(parser, argv)
    dests = [a.dest for a in leaf._actions if a.dest is not argparse.SUPPRESS and a.option_strings]
    # argparse only fills a default where the namespace has no attribute yet: pre-set a sentinel
    ns = argparse.Namespace(**{d: _UNSET for d in dests})
    ns, _ = leaf.parse_known_args(rest, ns)
    return {d for d in dests if getattr(ns, d) is not _UNSET}


def apply_preset(parser: argparse.ArgumentParser, argv: Sequence[str] | None, ns: argparse.Namespace,
                 out=None, command: str | None = None) -> list[str]:
    """Fill ``ns`` from ``ns.preset`` (if any) under the user's typed flags, print what the preset
    set (to ``out``, default stderr) and return those lines. ``parser``/``argv``: what ``ns`` was
    parsed from (the top-level parser and ``sys.argv[1:]`` are fine). ``command`` (``pipeline``,
    ``eval utility``, ...): by default the sub-command words found in ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lines: list[str] = []
    leaf, rest, words = leaf_parser(parser, argv)
    command = command or words
    if getattr(ns, "preset", None):
        if ns.preset not in PRESETS:
            raise HarmpruneError(f"unknown --preset {ns.preset!r}; choose one of {', '.join(PRESETS)}")
        typed = explicit_flags(leaf, rest)
        defaults = {a.dest: a.default for a in leaf._actions  # hidden old flag names have no default
                    if a.option_strings and a.dest not in (argparse.SUPPRESS, "preset", "help")
                    and a.default is not argparse.SUPPRESS}
        settings, lines = resolve(PRESETS[ns.preset], command, defaults, {k: getattr(ns, k) for k in typed})
        for k, v in settings.items():
            setattr(ns, k, v)
        print("\n".join(lines), file=out or sys.stderr)
    return lines
