"""--preset: each preset's resolved settings against the paper's values written out here, and flags
the user typed overriding a preset."""

import argparse
import dataclasses
import importlib
import io

import pytest

from harmprune.core.errors import HarmpruneError
from harmprune.core.settings import add_arguments, from_namespace
from harmprune.recipes.presets import PRESETS, apply_preset, explicit_flags, resolve


def _cls(name: str, *modules: str):
    """A config class from wherever it lives (pipeline/sweep are moving into recipes)."""
    for m in modules:
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(name)


PipelineConfig = _cls("PipelineConfig", "harmprune.recipes.pipeline")
SweepConfig = _cls("SweepConfig", "harmprune.recipes.sweep", "harmprune.pruning.sweep")
from harmprune.pruning.prune import PruneConfig  # noqa: E402

# B-TAP's README command lines, in harmprune's terms
PAPER = {"model": "meta-llama/Llama-3.1-8B-Instruct", "method": "snip", "benign_method": "snip-abs",
         "p": 5e-5, "scope": "matrix", "format": "raw", "nsamples": 412, "seed": 0, "dtype": "bfloat16"}
PAPER_Q = {"btap-llama3.1-8b": 1e-5, "btap-em-llama3.1-8b": 2e-5}


def parser_for(*classes):
    p = argparse.ArgumentParser()
    added: set = set()
    for c in classes:  # shared option groups (--preset among them) are added once, as the CLI does
        add_arguments(p, c, skip=tuple(added))
        added |= {f.name for f in dataclasses.fields(c)}
    return p


def defaults_of(*classes) -> dict:
    p = parser_for(*classes)
    return {a.dest: a.default for a in p._actions if a.option_strings and a.dest != "help" and a.default != argparse.SUPPRESS}


def test_the_table_has_the_papers_presets():
    assert set(PRESETS) == set(PAPER_Q)


@pytest.mark.parametrize("name", sorted(PAPER_Q))
def test_pipeline_settings_equal_the_papers(name):
    settings, lines = resolve(PRESETS[name], "pipeline", defaults_of(PipelineConfig), {"harm": "selfgen.jsonl"})
    assert {k: settings[k] for k in PAPER} == PAPER
    assert settings["q"] == PAPER_Q[name]
    assert settings["harm"] == "selfgen.jsonl"
    assert settings["benign"].startswith("hf:") and "alpaca" in settings["benign"]
    assert settings["max_length"] >= 4096  # the paper does not truncate
    # what it set is printed, one line per setting, and the benign-data caveat
    text = "\n".join(lines)
    for key in ("--q", "--p", "--method snip", "--benign-method snip-abs", "--format raw", "--nsamples 412"):
        assert key in text
    assert "safety" in text and "(preset)" in text


@pytest.mark.parametrize("name", sorted(PAPER_Q))
def test_the_models_own_harmful_data_is_required(name):
    with pytest.raises(HarmpruneError, match="--harm.*harmprune generate"):
        resolve(PRESETS[name], "pipeline", defaults_of(PipelineConfig), {})


def test_explicit_flags_override_the_preset():
    explicit = {"harm": "mine.jsonl", "q": 3e-5, "nsamples": 64, "scope": "row"}
    settings, lines = resolve(PRESETS["btap-llama3.1-8b"], "pipeline", defaults_of(PipelineConfig), explicit)
    assert settings["q"] == 3e-5 and settings["nsamples"] == 64 and settings["scope"] == "row"
    assert settings["p"] == 5e-5 and settings["format"] == "raw"  # the rest still from the preset
    assert any(line.strip().startswith("--q 3e-05") and "given" in line for line in lines)


def test_prune_takes_selection_settings_not_data():
    """`prune` takes score directories (--harm-scores/--benign-scores): the preset must not touch or require them."""
    d = defaults_of(PruneConfig)
    settings, lines = resolve(PRESETS["btap-llama3.1-8b"], "prune", d, {"harm_scores": "scores/h", "out": "o"})
    assert (settings["q"], settings["p"], settings["scope"], settings["dtype"]) == (1e-5, 5e-5, "matrix", "bfloat16")
    assert settings["harm_scores"] == "scores/h" and settings["benign_scores"] is None
    assert any("skipped" in line and "--format" in line and "--benign" in line for line in lines)


def test_sweep_gets_scoring_settings_and_skips_q_p():
    settings, lines = resolve(PRESETS["btap-llama3.1-8b"], "sweep", defaults_of(SweepConfig), {"harm": "s.jsonl"})
    assert {k: settings[k] for k in PAPER if k != "p"} == {k: v for k, v in PAPER.items() if k != "p"}
    assert "q" not in settings and any("skipped" in line and "--q" in line for line in lines)


def test_argparse_end_to_end_pipeline():
    p = parser_for(PipelineConfig)
    argv = ["--preset", "btap-llama3.1-8b", "--harm", "selfgen.jsonl", "--q=3e-5", "--seed", "0"]
    ns = p.parse_args(argv)
    buf = io.StringIO()
    lines = apply_preset(p, argv, ns, out=buf, command="pipeline")
    cfg = from_namespace(PipelineConfig, ns)
    assert cfg.q == 3e-5 and cfg.p == 5e-5 and cfg.format == "raw" and cfg.nsamples == 412
    assert cfg.method == "snip" and cfg.benign_method == "snip-abs" and cfg.dtype == "bfloat16"
    assert buf.getvalue().splitlines() == lines


def test_typed_value_equal_to_the_default_still_overrides():
    p = parser_for(PipelineConfig)
    default_q = p.get_default("q")
    argv = ["--preset", "btap-llama3.1-8b", "--harm", "h.jsonl", "--q", str(default_q)]
    ns = p.parse_args(argv)
    apply_preset(p, argv, ns, out=io.StringIO(), command="pipeline")
    assert ns.q == default_q != 1e-5


def test_prune_parser_q_p_come_from_the_preset_or_the_defaults():
    p = parser_for(PruneConfig)
    argv = ["--preset", "btap-llama3.1-8b", "--harm-scores", "scores/h", "--benign-scores", "scores/b", "--out", "o"]
    ns = p.parse_args(argv)
    apply_preset(p, argv, ns, out=io.StringIO(), command="prune")
    cfg = from_namespace(PruneConfig, ns)
    assert (cfg.q, cfg.p, cfg.scope) == (1e-5, 5e-5, "matrix")
    argv = ["--harm-scores", "scores/h", "--out", "o", "--p", "0"]
    ns = p.parse_args(argv)
    apply_preset(p, argv, ns, out=io.StringIO(), command="prune")  # no preset: the one default q
    assert from_namespace(PruneConfig, ns).q == 1e-4


def test_eval_utility_gets_the_papers_zero_shot_tasks():
    from harmprune.evals.generation import GenConfig
    from harmprune.evals.utility import UtilityConfig

    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="command")
    ev = sub.add_parser("eval").add_subparsers(dest="what")
    u = ev.add_parser("utility")
    add_arguments(u, UtilityConfig)
    add_arguments(u, GenConfig, skip=tuple(f.name for f in dataclasses.fields(UtilityConfig)))
    argv = ["eval", "utility", "--out", "r", "--preset", "btap-llama3.1-8b", "--model", "my-pruned-dir"]
    ns = top.parse_args(argv)
    lines = apply_preset(top, argv, ns, out=io.StringIO())
    assert ns.lm_eval_tasks == ["boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa"]
    assert ns.model == "my-pruned-dir" and ns.dtype == "bfloat16"
    assert ns.format == p_default(u, "format")  # the scoring format is not the evaluation's
    assert ns.max_length == p_default(u, "max_length")
    assert any("`eval utility`" in line for line in lines)


def p_default(parser, dest):
    return parser.get_default(dest)


def test_explicit_flags_spellings_and_subcommands():
    p = parser_for(PipelineConfig)
    assert explicit_flags(p, ["--q", "1e-4"]) == {"q"}
    assert explicit_flags(p, ["--q=1e-4", "--no-overwrite"]) == {"q", "overwrite"}
    assert explicit_flags(p, ["--nsamp", "3"]) == {"nsamples"}  # unambiguous prefix
    assert explicit_flags(p, []) == set()
    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="command")
    add_arguments(sub.add_parser("pipeline"), PipelineConfig)
    assert explicit_flags(top, ["pipeline", "--scope", "matrix", "--p", "0.01"]) == {"scope", "p"}
