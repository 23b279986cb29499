"""The ``harmprune`` command: one table of commands, each one typed function over settings dataclasses.

Every row of ``COMMANDS`` names the command, its settings classes (their fields are the options;
shared options come from the groups in ``core.options``, so a flag has one name, meaning and
default everywhere) and the function called with one instance of each class. Errors that are the
user's to fix (HarmpruneError) end as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .attribution.score import ScoreConfig, score
from .core import manifest, validate
from .core.errors import HarmpruneError
from .core.options import ConfigOptions
from .core.settings import add_arguments, add_deprecated, check_values, from_namespace
from .evals.compare import CompareConfig, compare
from .evals.em import EMConfig, eval_em
from .evals.generation import GenConfig
from .evals.harm import HarmConfig, eval_harm
from .evals.recognition import RecognitionConfig, eval_recognition
from .evals.utility import UtilityConfig, eval_utility
from .finetune.train import FinetuneConfig, finetune
from .pruning.prune import ApplyMaskConfig, PruneConfig, apply_mask_stage, prune
from .recipes.ablation.run import AblateConfig, ablate
from .recipes.align import AlignConfig, run_align
from .recipes.compare_alignment import CompareAlignmentConfig, run_compare_alignment
from .recipes.attacks import AttackConfig, run_attack
from .recipes.em_experiment import EMExperimentConfig, run_em_experiment
from .recipes.generalise import GeneraliseConfig, run_generalise
from .recipes.generate import GenerateConfig, generate_set
from .recipes.pipeline import PipelineConfig, run_pipeline
from .recipes import preflight
from .recipes.plan import PlanConfig, plan
from .recipes.subspace.activations import ActivationsConfig, run_activations
from .recipes.subspace.overlap import OverlapConfig, run_overlap
from .recipes.subspace.project import ProjectConfig, run_project
from .recipes.subspace.study import StudyConfig, run_subspace_study
from .recipes.sweep import SweepConfig, run_sweep


@dataclass(frozen=True)
class Command:
    name: str  # "score", or "eval harm" for a sub-command of a group
    run: Callable  # called with one instance of each class in ``configs``, in order
    configs: tuple
    help: str
    description: str = ""
    positional: tuple[str, ...] = ()  # fields taken as positional arguments (list fields: one or more)
    # the command's check step, called with the built settings after the generic checks and before
    # ``run``: what needs files, models' configs, judges or devices (recipes.preflight), nothing loaded
    check: Callable | None = None


COMMANDS: tuple[Command, ...] = (
    Command("score", score, (ScoreConfig,), "per-weight attribution scores (snip, snip-abs, wanda) for a dataset",
            "Score every matched linear weight for producing a dataset, in one pass; writes scores.safetensors "
            "and meta.json to --out."),
    Command("prune", prune, (PruneConfig,), "prune Top_q(harm) minus Top_p(benign) and save a checkpoint",
            "Prune Top_q(I_harm) minus Top_p(I_benign) (or a same-size control) and save a loadable checkpoint."),
    Command("apply-mask", apply_mask_stage, (ApplyMaskConfig,),
            "re-apply a saved mask to a checkpoint of the same architecture",
            "Zero a saved mask in another checkpoint of the same architecture (e.g. after fine-tuning)."),
    Command("pipeline", run_pipeline, (PipelineConfig,),
            "score (cached), prune and print the before/after NLL table (make prune)",
            "Score harmful and benign data (cached), prune the harm-specific set, save the checkpoint and "
            "compare held-out NLL with a random control."),
    Command("sweep", run_sweep, (SweepConfig,), "the before/after table over a (q, p) grid with controls (make sweep)",
            "Measure harmful and benign NLL increases over a (q, p) grid for the harm-specific set and "
            "same-size random/magnitude controls; CSV + PNG."),
    Command("generalise", run_generalise, (GeneraliseConfig,),
            "judged sweep: scoring set x protect set x selection x q on a held-out harmful set of another source",
            "Does the harm set generalise, and what does it cost? Each point judged under the prefill attack on "
            "--judged-set (continuation only and full reply), with refusal and stop rates, XSTest compliance and "
            "held-out NLL; the chosen point gets a random control (make generalise); writes generalise.csv, .md, "
            ".png, .json and samples.jsonl."),
    Command("compare-alignment", run_compare_alignment, (CompareAlignmentConfig,),
            "base vs aligned model: harm-specificity and the compression curve under the prefill attack",
            "The pipeline on --base and --aligned with the same data and settings: harm-specificity at each q, "
            "judged harmful generation under the prefill attack against the pruned fraction, and the smallest "
            "fraction that halves it (make compare-alignment); writes results.json, table.md, compare_alignment.png."),
    Command("eval harm", eval_harm, (HarmConfig, GenConfig),
            "harmfulness and refusal rate of the model's replies to harmful prompts"),
    Command("eval utility", eval_utility, (UtilityConfig, GenConfig),
            "benign and corpus NLL, over-refusal on XSTest, lm-eval tasks"),
    Command("eval recognition", eval_recognition, (RecognitionConfig,),
            "does the model itself tell harmful from benign requests (yes/no logprob)"),
    Command("eval em", eval_em, (EMConfig,),
            "emergent misalignment: sample answers to the EM questions, judge aligned/coherent",
            "Emergent-misalignment evaluation (Betley et al.): n answers per question at temperature 1, "
            "judged aligned and coherent 0-100; misaligned = aligned < 30 and coherent > 50."),
    Command("generate", generate_set, (GenerateConfig, GenConfig),
            "the model's own judged-harmful completions (B-TAP self-generated prune set)"),
    Command("compare", compare, (CompareConfig,), "eval runs side by side (first = baseline) with deltas",
            positional=("runs",)),
    Command("finetune", finetune, (FinetuneConfig,),
            "narrow fine-tune (LoRA, --full or QLoRA), optionally keeping a pruning mask at 0",
            "Fine-tune on chat data (response-only loss). --keep-mask keeps pruned weights exactly 0: after every "
            "step with --full, and in the --merge checkpoint with LoRA (an unmerged adapter does not keep the "
            "mask). Interrupted runs continue with --resume."),
    Command("ablate", ablate, (AblateConfig,),
            "per-category harm sets: overlap, transfer, compression curves, location",
            "Score each harm category, build its harm-specific set, and measure overlap (vs random sets), "
            "transfer across categories (and A minus B), compression curves and the layer/module distribution; "
            "writes results.json, report.md and figures."),
    Command("em-experiment", run_em_experiment, (EMExperimentConfig,),
            "EM experiment: original / harm-pruned / random control, each fine-tuned, then eval em",
            "Emergent-misalignment experiment with controls: fine-tune the original, the harm-pruned and a "
            "same-size random-control model on narrow data (masks kept at 0), evaluate EM of all six models, "
            "and write report.md and em_rates.png. Re-running skips finished steps."),
    Command("align", run_align, (AlignConfig,),
            "safety-tune a causal LM into an aligned organism (refuses harmful requests, answers benign ones)",
            "Safety-tune a model on shipped, permissively licensed data (harmful requests of several sources and "
            "phrasings -> refusals written from templates; benign requests -> compliant answers) into a loadable "
            "checkpoint; the smollm2-135m-aligned alias is this recipe on the embedded model (make align)."),
    Command("attack", run_attack, (AttackConfig,),
            "B-TAP's fine-tuning or refusal-ablation attack on original / harm-pruned / random control (make attack)",
            "Attack the original model, a make prune output (--pruned) and its same-size random control, then "
            "measure each with the headline table (judged harm with and without the prefill attack, utility). "
            "finetune: LoRA on the shipped harmful train split, the pruned model with its mask kept and free to "
            "re-learn; refusal-ablation: zero Top_q(refusal |SNIP|) minus Top_p(benign) in every model."),
    Command("plan", plan, (PlanConfig,), "estimated peak memory and passes of each stage, from the config alone"),
    Command("subspace project", run_project, (ProjectConfig,),
            "the aligned model plus the part of a fine-tune's update inside (parallel) or outside (orth) the "
            "alignment subspace, as a checkpoint with the energy kept"),
    Command("subspace overlap", run_overlap, (OverlapConfig,),
            "mode subspace overlap (MSO) of harmful, useful and alignment weight updates per layer and module type"),
    Command("subspace activations", run_activations, (ActivationsConfig,),
            "MSO of last-prompt-token hidden states of 2-3 prompt sets per layer"),
    Command("subspace study", run_subspace_study, (StudyConfig,),
            "the safety-subspace study (Ponkshe et al.) next to B-TAP on one (base, aligned) pair (make subspaces)"),
)

GROUPS = {"eval": "evaluate a model: harm, utility, recognition, em (each writes results.json, samples.jsonl, report.md)",
          "subspace": "safety subspaces (Ponkshe et al.): projections of updates, overlaps of updates and activations"}


def check_command(cmd: Command, ns: argparse.Namespace) -> tuple:
    """The check step of ``cmd``: every numeric flag finite and in its declared range, outputs off
    inputs, each settings class's own validation, then the command's ``check`` (files, models,
    judges, devices). Nothing is loaded or written before it passes; returns the settings."""
    values = vars(ns)
    for cls in cmd.configs:
        check_values(cls, values)
    validate.check_paths(cmd.configs, values)
    cfgs = tuple(from_namespace(c, ns) for c in cmd.configs)
    preflight.check_settings(cmd.name, *cfgs)
    if cmd.check is not None:
        cmd.check(*cfgs)
    return cfgs


def _runner(cmd: Command):
    def run(ns):
        result = cmd.run(*check_command(cmd, ns))
        if isinstance(result, Path):
            print(result)

    return run


def _no_task(group: str):
    def run(_ns):
        tasks = ",".join(c.name.split()[1] for c in COMMANDS if c.name.startswith(group + " "))
        raise HarmpruneError(f"{group} needs a task: harmprune {group} {{{tasks}}} --help")

    return run


def add_command(sub, cmd: Command, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
    for field in cmd.positional:
        p.add_argument(field, nargs="+", help=f"{field} (one or more)")
    added = set(cmd.positional)
    for cls in cmd.configs:  # a field two classes share comes from the same group: add it once
        add_arguments(p, cls, skip=tuple(added), deprecated=False)
        added |= {f.name for f in dataclasses.fields(cls)}
    add_arguments(p, ConfigOptions, skip=tuple(added), deprecated=False)  # --config: every command, one meaning
    for cls in cmd.configs:
        add_deprecated(p, cls, skip=cmd.positional)
    p.set_defaults(func=_runner(cmd))
    return p


def _setting(action: argparse.Action, key: str, value, path: str):
    """``value`` of a ``--config`` file as the option ``action`` would have parsed it (or a one-line error)."""
    def bad(why: str):
        return HarmpruneError(f"--config {path}: {key}: {why}, got {value!r}")

    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return value

    def one(v):
        tp = action.type or str
        if isinstance(v, (list, dict, bool)) or (tp is int and isinstance(v, float) and not v.is_integer()):
            raise bad(f"expected {'one ' if action.nargs in ('+', '*') else ''}{tp.__name__}")
        try:
            v = tp(v)
        except (TypeError, ValueError):
            raise bad(f"expected {tp.__name__}") from None
        if action.choices is not None and v not in action.choices:
            raise bad(f"expected one of {', '.join(map(str, action.choices))}")
        return v

    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise bad("expected a list")
        return [one(v) for v in value]
    return one(value)


def apply_config(parser: argparse.ArgumentParser, argv: list[str] | None, ns: argparse.Namespace) -> set[str]:
    """Fill ``ns`` from the ``--config`` file under the flags the user typed (as a preset: the file's
    values become the command's defaults, then what was typed wins); returns the typed settings.
    Unknown settings and values of the wrong type are one-line errors, before anything loads."""
    from .recipes.presets import explicit_flags, leaf_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    path = ns.config
    values = manifest.read_config(path)
    leaf, rest, words = leaf_parser(parser, argv)
    actions = {a.dest: a for a in leaf._actions  # hidden old flag names (default SUPPRESS) are not settings
               if a.dest not in (argparse.SUPPRESS, "help", "config") and a.default is not argparse.SUPPRESS}
    unknown = [k for k in values if k not in actions]
    if unknown:
        raise HarmpruneError(f"--config {path}: not settings of `harmprune {words}`: "
                             + ", ".join("--" + k.replace("_", "-") for k in unknown))
    values = {k: _setting(actions[k], k, v, path) for k, v in values.items()}
    typed = explicit_flags(leaf, rest)
    leaf.set_defaults(**values)  # a --preset typed on top resolves against the file's values
    for k, v in values.items():
        if k not in typed:
            setattr(ns, k, v)
    over = sorted("--" + k.replace("_", "-") for k in typed if k in values and k != "config")
    print(f"harmprune: {len(values)} settings from {path}" + (f"; given: {' '.join(over)}" if over else ""),
          file=sys.stderr)
    return typed


def relax_required(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.Action]:
    """When ``--config`` is typed, its file may give the command's required options: they stop being
    required to argparse, and :func:`apply_config` checks them after reading the file."""
    from .recipes.presets import leaf_parser

    leaf, rest, _ = leaf_parser(parser, argv)
    if leaf is parser or not any(t == "--config" or t.startswith("--config=") for t in rest):
        return []
    relaxed = [a for a in leaf._actions if a.required and a.option_strings]
    for a in relaxed:
        a.required = False
    return relaxed


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="harmprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"harmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        group, _, task = cmd.name.partition(" ")
        if not task:
            add_command(sub, cmd, group)
            continue
        if group not in groups:
            g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            g.set_defaults(func=_no_task(group))
            groups[group] = g.add_subparsers(dest=f"{group}_task", metavar="TASK")
        add_command(groups[group], cmd, task)
    return parser


def main(argv: list[str] | None = None) -> int:
    manifest.install_signal_handlers()  # SIGTERM/SIGHUP clean up like Ctrl-C
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    relaxed = relax_required(parser, argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        preset_given = True
        if getattr(args, "config", None) is not None:
            # a preset named in the file is already resolved into its values: apply only a typed one
            preset_given = "preset" in apply_config(parser, argv, args)
            for a in relaxed:
                if getattr(args, a.dest, None) is None:
                    raise HarmpruneError(f"{a.option_strings[0]} is required (on the command line or in --config)")
        if getattr(args, "preset", None) is not None and preset_given:
            if not args.preset.strip():
                raise HarmpruneError("--preset needs a name (list: harmprune.recipes.presets); leave it out for none")
            from .recipes.presets import apply_preset

            apply_preset(parser, argv, args)
        args.func(args)
    except HarmpruneError as e:
        print(f"harmprune: error: {e}", file=sys.stderr)
        return 2
    except manifest.Terminated as e:
        print(f"harmprune: interrupted ({e})", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("harmprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
