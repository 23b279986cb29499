"""One flag, one meaning, one default: every command's parser, checked flag by flag.

Each option records the option group (settings class) that declares its field; a flag name used by
several commands must come from one declaration, with one default and one type, except for the
short allow-list below (each entry with its reason).
"""

import argparse
from collections import defaultdict

import pytest

from harmprune.cli import COMMANDS, build_parser, main

# (flag, declaring group.field): why it may differ from the flag's other declaration
ALLOWED = {
    ("--dtype", "PruneConfig.dtype"): "prune loads the model as its scores were computed (default: their dtype), "
                                      "else the model hash would not match",
    **{(f, f"EMSamplingOptions.{n}"): "the EM protocol (Betley et al.): 50 answers per question at temperature 1, "
                                      "600 tokens, one question per generation batch"
       for f, n in (("--n", "n"), ("--temperature", "temperature"), ("--max-new-tokens", "max_new_tokens"),
                    ("--gen-batch-size", "gen_batch_size"))},
    ("--judge", "RatingJudgeOptions.judge"): "EM needs a 0-100 rating judge: the offline EM judge (em-classifier), "
                                              "not the harm judges",
    ("--judge", "GenerateConfig.judge"): "generate keeps replies the classifier calls harmful",
    ("--prompts", "GenerateConfig.prompts"): "generate writes scoring data: the train split, never the held-out one",
}


def all_options():
    """``{flag: [(command, action)]}`` over every (sub)command, hidden deprecated names left out."""
    out = defaultdict(list)

    def walk(parser, prefix):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, prefix + [name])
            elif a.option_strings and a.dest not in ("help", "version") and a.help != argparse.SUPPRESS:
                out[a.option_strings[0]].append((" ".join(prefix), a))

    walk(build_parser(), [])
    return out


OPTIONS = all_options()


def test_every_command_is_parsed():
    commands = {c for uses in OPTIONS.values() for c, _ in uses}
    assert commands == {c.name for c in COMMANDS} and len(commands) >= 15


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_one_declaration_default_and_type_per_flag(flag):
    uses = [(cmd, a) for cmd, a in OPTIONS[flag] if (flag, a.harmprune_origin) not in ALLOWED]
    kinds = {(a.harmprune_origin, repr(a.default), getattr(a.type, "__name__", None), tuple(a.choices or ())): cmd
             for cmd, a in uses}
    assert len(kinds) <= 1, f"{flag} differs between commands: " + "; ".join(f"{c}: {k}" for k, c in kinds.items())


def test_allow_list_is_short_and_used():
    used = {(f, a.harmprune_origin) for f, uses in OPTIONS.items() for _, a in uses}
    assert set(ALLOWED) <= used and len({why for why in ALLOWED.values()}) <= 5


def test_issue_flags_now_mean_one_thing():
    """The examples of the issue: --harm, --max-length, --device, --limit, --batch-size."""
    by = {f: {cmd: a for cmd, a in OPTIONS[f]} for f in ("--harm", "--max-length", "--device", "--limit", "--batch-size")}
    assert "prune" not in by["--harm"] and {"pipeline", "sweep"} <= set(by["--harm"])
    assert by["--max-length"]["em-experiment"].harmprune_origin == by["--max-length"]["pipeline"].harmprune_origin
    assert {a.default for a in by["--device"].values()} == {"auto"}
    assert {a.default for a in by["--limit"].values()} == {0}
    assert "finetune" not in by["--batch-size"] and "eval harm" not in by["--batch-size"]
    assert {"pipeline", "sweep", "ablate"} <= set(OPTIONS["--targets"][i][0] for i in range(len(OPTIONS["--targets"])))


def test_the_checker_sees_a_second_declaration():
    """A flag declared twice is caught: --eval-benign once came from UtilityConfig and BenignOptions."""
    fake = [("a", argparse.Namespace(harmprune_origin="X.f", default=1, type=int, choices=None)),
            ("b", argparse.Namespace(harmprune_origin="Y.f", default=1, type=int, choices=None))]
    kinds = {(a.harmprune_origin, repr(a.default), a.type.__name__, ()) for _, a in fake}
    assert len(kinds) == 2


def test_renamed_flag_works_with_a_one_line_notice(tmp_path, capsys):
    """prune --harm DIR (now --harm-scores) still parses, into the new field, with a deprecation line."""
    ns = build_parser().parse_args(["prune", "--harm", "h", "--benign", "b", "--out", str(tmp_path / "o")])
    assert ns.harm_scores == "h" and ns.benign_scores == "b"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("deprecated" in line and "harmprune: warning:" in line for line in err)
    assert "--harm-scores" in err[0]


def test_old_flag_meaning_something_else_now_is_not_an_alias():
    """eval utility's --batch-size is the NLL batch (PassOptions), not the old generation-batch alias."""
    ns = build_parser().parse_args(["eval", "utility", "--out", "o", "--batch-size", "3"])
    assert ns.batch_size == 3 and ns.gen_batch_size == 0  # 0 = the device's default
    ns = build_parser().parse_args(["eval", "harm", "--out", "o", "--batch-size", "3"])
    assert ns.gen_batch_size == 3


def test_main_runs_a_group_without_task(capsys):
    assert main(["eval"]) == 2
    assert "eval needs a task" in capsys.readouterr().err
