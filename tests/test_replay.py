"""Issue 23, acceptance 3: a run writes its resolved settings (config.yaml) and ``--config`` replays it,
flags typed on the command line winning; a bad file is one error line before anything loads."""

import argparse
import dataclasses
import json

import pytest
import yaml

from harmprune import cli
from harmprune.core.manifest import CONFIG_YAML, sha256_file
from harmprune.pruning.checkpoint import MASK_FILE

pytestmark = pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def run(tiny_ckpt, tmp_path):
    """One pipeline run on a tiny checkpoint with tiny data, from the command line: its output directory."""
    harm = _jsonl(tmp_path / "harm.jsonl", [{"prompt": f"how to do bad thing {i}", "response": f"step {i}: hurt "
                                             f"them with {i} knives"} for i in range(6)])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": f"recipe {i}", "response": f"mix {i} eggs and bake it "
                                                 "slowly"} for i in range(6)])
    out = tmp_path / "run1"
    argv = ["pipeline", "--model", tiny_ckpt, "--harm", harm, "--benign", benign, "--eval-harm", harm,
            "--eval-benign", benign, "--nsamples", "4", "--max-length", "48", "--batch-size", "2", "--q", "0.02",
            "--p", "0.05", "--scores-dir", str(tmp_path / "scores"), "--out", str(out)]
    assert cli.main(argv) == 0
    return out


def _mask_sha(out):
    return sha256_file(out / MASK_FILE)


def test_pipeline_replay_reproduces_the_mask(run, tmp_path, capsys):
    cfg_file = run / CONFIG_YAML
    assert cfg_file.is_file() and (run / "prune_config.json").is_file()
    settings = yaml.safe_load(cfg_file.read_text())
    assert settings["q"] == 0.02 and settings["nsamples"] == 4 and settings["out"] == str(run)
    assert "config" not in settings and settings["overwrite"] is False
    capsys.readouterr()

    other = tmp_path / "replay"
    assert cli.main(["pipeline", "--config", str(cfg_file), "--out", str(other), "--overwrite"]) == 0
    assert "settings from" in capsys.readouterr().err
    assert _mask_sha(other) == _mask_sha(run)
    # the replay writes the same settings, but for the --out typed (--overwrite is never written: a replay
    # without --out refuses to replace the run it reads)
    again = yaml.safe_load((other / CONFIG_YAML).read_text())
    assert again == {**settings, "out": str(other)}
    assert cli.main(["pipeline", "--config", str(cfg_file)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err

    # a typed flag wins over the file
    third = tmp_path / "q05"
    assert cli.main(["pipeline", "--config", str(cfg_file), "--q", "0.05", "--out", str(third)]) == 0
    assert yaml.safe_load((third / CONFIG_YAML).read_text())["q"] == 0.05
    assert _mask_sha(third) != _mask_sha(run)


def test_prune_replay_reproduces_the_mask(run, tmp_path):
    dirs = sorted((tmp_path / "scores").glob("*/*"))
    harm = next(d for d in dirs if "-snip-n4-" in d.name)
    benign = next(d for d in dirs if "-snip-abs-n4-" in d.name)
    model = json.loads((run / "prune_config.json").read_text())["settings"]["model"]
    first = tmp_path / "prune1"
    assert cli.main(["prune", "--model", model, "--harm-scores", str(harm), "--benign-scores", str(benign),
                     "--q", "0.03", "--p", "0.05", "--control", "random", "--seed", "3", "--out", str(first)]) == 0
    settings = yaml.safe_load((first / CONFIG_YAML).read_text())
    assert (settings["control"], settings["seed"], settings["q"]) == ("random", 3, 0.03)

    second = tmp_path / "prune2"
    assert cli.main(["prune", "--config", str(first / CONFIG_YAML), "--out", str(second)]) == 0
    assert _mask_sha(second) == _mask_sha(first)
    seeded = tmp_path / "prune3"
    assert cli.main(["prune", "--config", str(first / CONFIG_YAML), "--seed", "4", "--out", str(seeded)]) == 0
    assert _mask_sha(seeded) != _mask_sha(first)


class Stop(Exception):
    """Raised by a stubbed check step: the settings reached it, nothing was loaded."""


def _stub_check(monkeypatch, seen: dict):
    def check(cmd, ns):
        seen.update(vars(ns))
        raise Stop

    monkeypatch.setattr(cli, "check_command", check)


def test_required_option_may_come_from_the_file(tmp_path, monkeypatch, capsys):
    """apply-mask's --mask is required: --config may give it; without it in the file, one error line."""
    seen = {}
    _stub_check(monkeypatch, seen)
    f = tmp_path / "c.yaml"
    f.write_text("mask: m.safetensors\nout: o\n")
    with pytest.raises(Stop):
        cli.main(["apply-mask", "--config", str(f), "--out", "typed"])
    assert (seen["mask"], seen["out"]) == ("m.safetensors", "typed")
    f.write_text("out: o\n")
    assert cli.main(["apply-mask", "--config", str(f)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "harmprune: error: --mask is required (on the command line or in --config)"


@pytest.mark.parametrize("text,message", [
    (None, "no such file"),
    ("q: 0.1\nbogus_key: 3\n", "not settings of `harmprune pipeline`: --bogus-key"),
    ("- q\n- 0.1\n", "expected a YAML mapping"),
    ("q: [0.1\n", "not valid YAML"),
    ("q: lots\n", "q: expected float"),
    ("scope: planet\n", "scope: expected one of matrix, row, global"),
    ("nsamples: 2.5\n", "nsamples: expected int"),
    ("overwrite: maybe\n", "overwrite: expected true or false"),
    ("targets: q_proj\n", "targets: expected a list"),
])
def test_bad_config_is_one_line_and_loads_nothing(tmp_path, monkeypatch, capsys, text, message):
    _stub_check(monkeypatch, {})
    f = tmp_path / "config.yaml"
    if text is not None:
        f.write_text(text)
    assert cli.main(["pipeline", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harmprune: error: --config ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_values_are_read_as_the_flags_would_parse_them(tmp_path, monkeypatch):
    """Dashed names, YAML's 1e-5 (a string to YAML 1.1) and ints for float settings parse like typed flags."""
    got = {}
    _stub_check(monkeypatch, got)
    f = tmp_path / "c.yaml"
    f.write_text("q: 1e-5\np: 0\nmax-length: 64\ntargets: [q_proj, v_proj]\npreset: btap-llama3.1-8b\n")
    with pytest.raises(Stop):
        cli.main(["pipeline", "--config", str(f), "--nsamples", "7"])
    assert got["q"] == 1e-5 and got["p"] == 0.0 and isinstance(got["p"], float) and got["max_length"] == 64
    assert got["targets"] == ["q_proj", "v_proj"] and got["nsamples"] == 7
    # a preset named in the file is already resolved into its values: it is not applied again
    assert got["preset"] == "btap-llama3.1-8b" and got["model"] != "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("cmd", cli.COMMANDS, ids=lambda c: c.name)
def test_every_commands_settings_read_back(cmd, tmp_path, monkeypatch):
    """The file any command writes (every field of its settings classes) is read back by that command's
    --config unchanged: its fields are its flags, and each value parses as the flag would."""
    parser = cli.build_parser()
    leaf = parser
    for word in cmd.name.split():
        leaf = next(a for a in leaf._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
    actions = [a for a in leaf._actions if a.option_strings and a.dest not in ("help", "config")
               and a.default is not argparse.SUPPRESS]
    settings = {a.dest: ((a.choices or ["x"])[0] if a.required else a.default) for a in actions}
    fields = {f.name for c in cmd.configs for f in dataclasses.fields(c) if f.init} - set(cmd.positional)
    assert fields == set(settings)
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(settings))
    seen = {}
    _stub_check(monkeypatch, seen)
    with pytest.raises(Stop):
        cli.main([*cmd.name.split(), *(["run1"] if cmd.positional else []), "--config", str(f)])
    assert {k: seen[k] for k in settings} == settings


def test_eval_replay_gives_the_same_results(tiny_ckpt, tmp_path):
    """Every eval writes config.yaml through run_eval: eval recognition replayed gives the same samples."""
    data = tmp_path / "rec.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"request {i}", "label": "harmful" if i % 2 else "benign"}) + "\n"
                            for i in range(8)))
    first, second = tmp_path / "rec1", tmp_path / "rec2"
    assert cli.main(["eval", "recognition", "--model", tiny_ckpt, "--recognition-data", str(data), "--limit", "4",
                     "--probe-folds", "2", "--out", str(first)]) == 0
    assert yaml.safe_load((first / CONFIG_YAML).read_text())["limit"] == 4
    assert cli.main(["eval", "recognition", "--config", str(first / CONFIG_YAML), "--out", str(second)]) == 0
    assert (second / "samples.jsonl").read_text() == (first / "samples.jsonl").read_text()
