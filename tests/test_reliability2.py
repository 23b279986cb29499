"""Issue 24: fault injection on the commands of issue 12, fixed by mechanisms, not patches.

- every numeric flag declares its range once (``opt(..., range=...)``); ``cli.check_command`` checks
  them, keeps outputs off inputs (``opt(..., role=...)``, ``validate.check_paths``) and runs each
  command's check step before any model is loaded or anything written (acceptance 2 and 3, table-driven
  over ``cli.COMMANDS``);
- one test per defect of the issue (``test_dNN_*``), on tiny models, in the style of
  ``tests/test_reliability.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest

from harmprune.cli import COMMANDS, build_parser, main
from harmprune.core.settings import numeric_fields, parse_range, path_fields

sys.path.insert(0, str(Path(__file__).parent))
from test_reliability import ROWS, leftovers, one_error, run, write_jsonl  # noqa: E402

# the least each command needs to parse (its required flags)
REQUIRED = {"apply-mask": ["--mask", "m"], "compare": ["r1"], "attack": ["--attack", "finetune"],
            "subspace project": ["--finetuned", "f"], "subspace overlap": ["--harmful", "h", "--useful", "u"]}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model or tokenizer load, alias build or checkpoint read fails the test."""
    import transformers

    import harmprune.core.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the check step passed")

    for mod in [m for name, m in list(sys.modules.items()) if name.startswith("harmprune") and m is not None]:
        for attr in ("load_model", "load_tokenizer", "resolve_alias"):
            if hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, boom)
    monkeypatch.setattr(models, "resolve_alias", boom)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


# ---------------------------------------------------------------- acceptance 2: numeric flags


def bad_values(kind: type, spec: str | None) -> list[str]:
    """Values outside ``spec`` (and, for floats, the non-finite ones)."""
    assert spec, "every numeric flag declares its range"
    lo, lo_in, hi, hi_in = parse_range(spec)
    step = 1 if kind is int else 0.5
    out = []
    if lo != float("-inf"):
        out.append(lo if not lo_in else lo - step)
    if hi != float("inf"):
        out.append(hi if not hi_in else hi + step)
    out = [str(int(v)) if kind is int else repr(float(v)) for v in out]
    return out + (["nan", "inf", "-inf"] if kind is float else [])


NUMERIC = sorted({(cmd.name, name, kind, spec) for cmd in COMMANDS for cls in cmd.configs
                  for name, (kind, spec) in numeric_fields(cls).items()}, key=lambda t: (t[0], t[1]))


def test_every_numeric_flag_declares_a_range():
    missing = [f"{c} {flag(n)}" for c, n, _, spec in NUMERIC if not spec]
    assert not missing and len(NUMERIC) > 100, missing


@pytest.mark.parametrize("command", sorted({c.name for c in COMMANDS}))
def test_acceptance2_bad_numeric_values_end_before_a_model_loads(command, tmp_path, capsys, nothing_loads):
    """Every numeric flag of every command: out of range or non-finite -> exit 2, one error line."""
    cases = [(n, v) for c, n, kind, spec in NUMERIC if c == command for v in bad_values(kind, spec)]
    out = tmp_path / "out"
    for name, value in cases:
        rc, errors, warnings = run(capsys, *command.split(), *REQUIRED.get(command, []), f"{flag(name)}={value}",
                                   "--out", out) if "out" in _fields(command) else \
            run(capsys, *command.split(), *REQUIRED.get(command, []), f"{flag(name)}={value}")
        assert rc == 2 and len(errors) == 1 and flag(name) in errors[0], (command, name, value, errors, warnings)
    assert not out.exists() and not leftovers(tmp_path)


def _fields(command: str) -> set[str]:
    cmd = next(c for c in COMMANDS if c.name == command)
    return {n for cls in cmd.configs for n in cls.__dataclass_fields__}


# ---------------------------------------------------------------- acceptance 3: outputs never touch inputs


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def roles(command: str) -> dict[str, str]:
    cmd = next(c for c in COMMANDS if c.name == command)
    out: dict[str, str] = {}
    for cls in cmd.configs:
        out.update(path_fields(cls))
    return out


PAIRS = [(c.name, o, i) for c in COMMANDS for o, r in roles(c.name).items() if r == "output"
         for i, r2 in roles(c.name).items() if r2 == "input"]


def argv_for(command: str, values: dict[str, str]) -> list[str]:
    """``command`` with its required flags, ``values`` replacing them where they overlap."""
    cmd = next(c for c in COMMANDS if c.name == command)
    req = list(REQUIRED.get(command, []))
    if cmd.positional:
        pos = values.pop(cmd.positional[0], None)
        if pos is not None:
            req = [pos]
    i, base = 0, []
    while i < len(req):
        if req[i].startswith("--") and req[i][2:].replace("-", "_") in values:
            i += 2
            continue
        base.append(req[i])
        i += 1
    extra = [x for n, v in values.items() for x in (flag(n), v)]
    if "overwrite" in _fields(command):
        extra.append("--overwrite")
    return [*command.split(), *base, *extra]


def test_acceptance3_pairs_cover_every_command_with_an_output():
    with_out = {c.name for c in COMMANDS if any(r == "output" for r in roles(c.name).values())}
    assert {c for c, _, _ in PAIRS} == with_out and len(with_out) >= 20


@pytest.mark.parametrize("command", sorted({c for c, _, _ in PAIRS}))
def test_acceptance3_out_equal_to_an_input_never_changes_it(command, tiny_ckpt, tmp_path, capsys, nothing_loads):
    """Each output flag (--out, caches, factor/fine-tune dirs) set to each input (a real checkpoint),
    with --overwrite: exit 2, one line, the input byte for byte as before; same for an output that
    contains the input."""
    before = tree_hash(Path(tiny_ckpt))
    for cmd, output, inp in PAIRS:
        if cmd != command:
            continue
        for out_value in (tiny_ckpt, str(Path(tiny_ckpt).parent)):
            values = {inp: tiny_ckpt, output: out_value}
            one_error(*run(capsys, *argv_for(command, values)), "never writes over what it reads", flag(inp))
            assert tree_hash(Path(tiny_ckpt)) == before, (command, output, inp)
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------- defects: shared inputs

from test_reliability import (_Judge, count_generation, cut, data, judge_server, prompts, prune_args,  # noqa: E402,F401
                              scored)


@pytest.fixture
def pair(tmp_path, tok):
    """(base, aligned, finetuned) tiny Llama checkpoints of one architecture, different weights."""
    from tiny import save_tiny, tiny_llama

    return tuple(save_tiny(tmp_path / name, tiny_llama(tok, seed=s), tok)
                 for name, s in (("base", 1), ("aligned", 2), ("ft", 3)))


@pytest.fixture
def pruned(tiny_ckpt, scored, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run(capsys, *prune_args(tiny_ckpt, scored, out))[0] == 0
    return out


def attack_args(ckpt, pruned, out):
    return ("attack", "--attack", "finetune", "--model", ckpt, "--pruned", pruned, "--out", out, "--device", "cpu")


# ---------------------------------------------------------------- data loss (20, 21)


def test_d20_factor_dir_equal_to_out_is_refused_before_writing(pair, tmp_path, capsys, nothing_loads):
    base, aligned, ft = pair
    x = tmp_path / "x"
    one_error(*run(capsys, "subspace", "project", "--base", base, "--aligned", aligned, "--finetuned", ft,
                   "--factor-dir", x, "--out", x), "--factor-dir", "same path")
    assert not x.exists() and not leftovers(tmp_path)


def test_d21_out_equal_to_aligned_with_overwrite_keeps_the_input(pair, tmp_path, capsys, nothing_loads):
    base, aligned, ft = pair
    from test_reliability2 import tree_hash  # noqa: F401 - same module, explicit for readers

    before = tree_hash(Path(aligned))
    one_error(*run(capsys, "subspace", "project", "--base", base, "--aligned", aligned, "--finetuned", ft,
                   "--out", aligned, "--overwrite"), "--aligned", "never writes over what it reads")
    assert tree_hash(Path(aligned)) == before


# ---------------------------------------------------------------- silent wrong results (9-15)


def test_d09_pruned_without_prune_config_is_refused(tiny_ckpt, pruned, tmp_path, capsys, nothing_loads):
    (pruned / "prune_config.json").unlink()
    out = tmp_path / "attack"
    one_error(*run(capsys, *attack_args(tiny_ckpt, pruned, out)), "no prune_config.json", str(pruned))
    assert not out.exists()


def test_d10_align_uses_its_lora_flags():
    from harmprune.recipes.align.run import AlignConfig, _finetune_config

    cfg = AlignConfig(out="o", lora=True, lora_r=8, lora_alpha=3.0, rslora=False, lora_dropout=0.1)
    ft = _finetune_config(cfg, Path("d.jsonl"), Path("ft"))
    assert (ft.lora_r, ft.lora_alpha, ft.rslora, ft.lora_dropout) == (8, 3.0, False, 0.1)


def test_d11_no_usable_held_out_row_is_an_error_not_zero(tiny_ckpt):
    from harmprune.core.data import Record
    from harmprune.core.errors import HarmpruneError
    from harmprune.core.models import load_model
    from harmprune.evals.nll import response_nll

    model, tok = load_model(tiny_ckpt)
    rows = [Record(prompt="p" * 200, response="an answer") for _ in range(4)]
    with pytest.raises(HarmpruneError, match="none of the 4 records.*--max-length 64"):
        response_nll(model, tok, rows, max_length=64, desc="nll harmful")
    ok = response_nll(model, tok, rows[:2] + [Record(prompt="short", response="an answer")], max_length=64)
    assert ok["samples"] == 1 and ok["skipped"] == 2  # the printed n is the measured one


def test_d12_resume_on_a_cut_samples_file_is_refused(tiny_ckpt, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ("eval", "harm", "--model", tiny_ckpt, "--prompts", prompts, "--judge", "fake:error", "--max-new-tokens", 2,
            "--out", out)
    assert run(capsys, *argv)[0] == 2 and (out / "samples.jsonl").is_file()
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text(lines[0] + "\n")
    one_error(*run(capsys, *argv, "--resume", "--max-judge-errors", 1), "holds 1 replies but the run generated 2",
              "--overwrite")
    assert not (out / "results.json").exists()


def test_d13_held_out_draw_is_seeded_over_distinct_prompts():
    from harmprune.core.data import Record
    from harmprune.evals.results import draw

    rows = [Record(prompt="same prompt", response=f"r{i}") for i in range(6)] + \
        [Record(prompt=f"other {i}", response="r") for i in range(6)]
    picked = draw(rows, 4, seed=0)
    assert len(picked) == 4 and len({r.prompt for r in picked}) == 4
    assert picked == draw(rows, 4, seed=0) and draw(rows, 0, 0) == rows


@pytest.mark.parametrize("command", [["eval", "em", "--judge", "fake"], ["eval", "harm", "--judge", "fake"]])
def test_d14_infinite_temperature_is_refused(command, tiny_ckpt, tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, *command, "--model", tiny_ckpt, "--temperature", "inf", "--out", tmp_path / "o"),
              "--temperature must be a finite number")


def test_d15_negative_xstest_limit_is_refused(tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, "subspace", "study", "--xstest-limit", -1, "--out", tmp_path / "o"),
              "--xstest-limit must be >= 0, got -1")


# ---------------------------------------------------------------- tracebacks (1-8)


def test_d01_garbled_prune_config_is_one_line(tiny_ckpt, pruned, tmp_path, capsys, nothing_loads):
    (pruned / "prune_config.json").write_text('{"model": {"model_hash": ')
    one_error(*run(capsys, *attack_args(tiny_ckpt, pruned, tmp_path / "a")), str(pruned / "prune_config.json"),
              "corrupt or cut short")


def test_d02_factor_dir_that_is_a_file_or_below_one(pair, tmp_path, capsys, nothing_loads):
    base, aligned, ft = pair
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for factor_dir, needle in ((a_file, "is a file"), (a_file / "sub", "is a file")):
        one_error(*run(capsys, "subspace", "project", "--base", base, "--aligned", aligned, "--finetuned", ft,
                       "--factor-dir", factor_dir, "--out", tmp_path / "o"), "--factor-dir", needle)
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_d03_cut_short_safetensors_in_subspace_commands(pair, tmp_path, capsys):
    base, aligned, ft = pair
    cut(Path(ft) / "model.safetensors")
    for argv in (["subspace", "project", "--finetuned", ft], ["subspace", "overlap", "--harmful", ft, "--useful", ft]):
        one_error(*run(capsys, *argv, "--base", base, "--aligned", aligned, "--out", tmp_path / "o", "--device", "cpu"),
                  str(Path(ft) / "model.safetensors"), "cut short")
    # a reader opened directly (a study's re-used fine-tune goes through it) says the same
    from harmprune.core.errors import HarmpruneError
    from harmprune.recipes.subspace.checkpoints import TensorReader

    with pytest.raises(HarmpruneError, match="cut short"):
        TensorReader(ft, "finetuned")


def test_d04_finetune_dir_that_is_a_file(tmp_path, capsys, nothing_loads):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    one_error(*run(capsys, "subspace", "study", "--finetune-dir", a_file, "--out", tmp_path / "o"),
              "--finetune-dir", "is a file")


def test_d05_second_band_that_cannot_fit_is_refused_first(tiny_ckpt, scored, tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, *prune_args(tiny_ckpt, scored, tmp_path / "p"), "--q", 0.6, "--control", "second-band"),
              "second-band", "--q 0.6")
    one_error(*run(capsys, "sweep", "--model", tiny_ckpt, "--qs", 0.1, 0.6, "--controls", "second-band",
                   "--out", tmp_path / "s", "--scores-dir", tmp_path / "sc"), "second-band", "--qs 0.6")
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_d05_a_point_that_cannot_be_drawn_is_a_harmprune_error():
    import torch

    from harmprune.core.errors import HarmpruneError
    from harmprune.pruning.select import second_band_control

    mask = {"w": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(HarmpruneError, match="only 0 are free"):
        second_band_control(mask, {"w": torch.rand(2, 2)})


def test_d06_judge_url_that_is_not_a_url(tiny_ckpt, tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, "eval", "harm", "--model", tiny_ckpt, "--judge", "openai:x", "--judge-url", "notaurl",
                   "--out", tmp_path / "o"), "--judge-url 'notaurl' is not an http(s) URL")


@pytest.mark.parametrize("judge", ["hf:gpt2-judge/x", "classifier"])
@pytest.mark.parametrize("device, needle", [("foo", "'foo' is not a device"), ("cuda:7", "--judge-device cuda:7")])
def test_d07_judge_device_is_checked(judge, device, needle, tiny_ckpt, tmp_path, capsys, monkeypatch, nothing_loads):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error(*run(capsys, "eval", "harm", "--model", tiny_ckpt, "--judge", judge, "--judge-device", device,
                   "--device", "cpu", "--out", tmp_path / "o"), needle)


def test_d08_resume_with_a_row_missing_its_prompt(tiny_ckpt, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ("eval", "harm", "--model", tiny_ckpt, "--prompts", prompts, "--judge", "fake:error", "--max-new-tokens", 2,
            "--out", out)
    assert run(capsys, *argv)[0] == 2
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    del rows[0]["prompt"]
    write_jsonl(out / "samples.jsonl", rows)
    one_error(*run(capsys, *argv, "--resume", "--max-judge-errors", 1), "samples.jsonl row 1", "'prompt'")


# ---------------------------------------------------------------- late validation (16-19)


def test_d16_unreachable_judge_fails_before_generation(tiny_ckpt, judge_server, tmp_path, capsys, monkeypatch,
                                                       nothing_loads):
    _Judge.mode = "hang"
    one_error(*run(capsys, "eval", "em", "--model", tiny_ckpt, "--judge", "openai:stub", "--judge-url", judge_server,
                   "--judge-timeout", 0.3, "--judge-retries", 0, "--out", tmp_path / "o"),
              "failed its check before generation")
    _Judge.mode = "401"  # commands without --judge-url take the endpoint from the environment
    monkeypatch.setenv("HARMPRUNE_JUDGE_URL", judge_server)
    for argv in (["compare-alignment", "--base", tiny_ckpt], ["pipeline", "--model", tiny_ckpt, "--headline"],
                 ["subspace", "study"]):
        one_error(*run(capsys, *argv, "--judge", "openai:stub", "--out", tmp_path / "o"),
                  "failed its check before generation", "HTTP 401")
    assert not (tmp_path / "o").exists()


def test_d17_study_refuses_an_unknown_judge_first(tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, "subspace", "study", "--judge", "nonsense", "--out", tmp_path / "o"), "unknown judge")


def test_d18_compare_alignment_pair_is_checked_first(tiny_ckpt, tmp_path, tok, capsys, nothing_loads):
    from tiny import save_tiny, tiny_llama, tiny_qwen2

    qwen = save_tiny(tmp_path / "qwen", tiny_qwen2(tok), tok)
    one_error(*run(capsys, "compare-alignment", "--base", tiny_ckpt, "--aligned", qwen, "--out", tmp_path / "o"),
              "differ in model_type")
    one_error(*run(capsys, "compare-alignment", "--base", tiny_ckpt, "--aligned", tiny_ckpt, "--out", tmp_path / "o"),
              "same checkpoint")
    wide = save_tiny(tmp_path / "wide", tiny_llama(tok, hidden=48), tok)
    one_error(*run(capsys, "compare-alignment", "--base", tiny_ckpt, "--aligned", wide, "--out", tmp_path / "o"),
              "differ in hidden_size (32 vs 48)")


def test_d19_judges_dtypes_and_data_are_checked_before_loading(tiny_ckpt, tmp_path, capsys, nothing_loads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
    cases = [(["pipeline", "--model", tiny_ckpt, "--judge", "bogus", "--headline"], "unknown judge"),
             (["align", "--model", tiny_ckpt, "--dtype", "int8"], "unknown dtype 'int8'"),
             (["align", "--model", tiny_ckpt, "--lr", "nan"], "--lr must be a finite number"),
             (["score", "--model", tiny_ckpt, "--data", tmp_path / "missing.jsonl"], "missing.jsonl"),
             (["score", "--model", tiny_ckpt, "--data", bad], "bad.jsonl"),
             (["pipeline", "--model", tiny_ckpt, "--eval-harm", bad], "--eval-harm")]
    for argv, needle in cases:
        one_error(*run(capsys, *argv, "--out", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- leftovers, messages, silently accepted


def test_d22_scratch_dirs_of_dead_runs_are_removed_at_the_next_start(tmp_path, monkeypatch):
    import socket
    import subprocess
    import tempfile

    from harmprune.core import manifest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now dead, as after a SIGKILL
    dead = tmp_path / f"harmprune-align-{socket.gethostname()}-{proc.pid}-abc123"
    dead.mkdir()
    (dead / "align_data.jsonl").write_text("x")
    with manifest.work_dir("harmprune-align") as work:
        assert work.is_dir() and not dead.exists()
    assert not work.exists() and list(tmp_path.iterdir()) == []


def test_d23_ctrl_c_cancels_judge_requests_in_flight(judge_server):
    """SIGINT while every worker waits on a hung endpoint: the process ends within 3 s, not after
    --judge-timeout (20 s here) and its retries."""
    import signal
    import subprocess
    import time

    _Judge.mode = "hang"
    # a background job (nohup, CI runners) starts with SIGINT ignored and Python then installs no handler: restore
    # the terminal's Ctrl-C behaviour in the child explicitly
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from harmprune.evals.judges import get_judge\n"
            f"j = get_judge('openai:stub', url={judge_server!r}, timeout=20, concurrency=2)\n"
            "try:\n    j.judge(['p'] * 6, ['r'] * 6)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _Judge.calls < 2 and time.monotonic() < deadline:  # both workers wait on the server
        time.sleep(0.05)
    assert _Judge.calls == 2
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    proc.kill()
    assert rc == 130 and time.monotonic() - t0 < 3 and _Judge.calls == 2  # nothing queued was sent


def test_d24_alias_cache_problems_name_the_cache(tmp_path, monkeypatch):
    from harmprune.core.errors import HarmpruneError
    from harmprune.core.models import resolve_alias

    a_file = tmp_path / "cache"
    a_file.write_text("x")
    monkeypatch.setenv("HARMPRUNE_CACHE", str(a_file))
    with pytest.raises(HarmpruneError, match="model cache of alias 'smollm2-135m-aligned'") as e:
        resolve_alias("smollm2-135m-aligned")
    assert "--out" not in str(e.value)


def test_d25_gen_batch_size_zero_names_its_flag(tiny_ckpt, tmp_path, capsys, nothing_loads):
    # 0 now means the device's default batch (evals.backends.default_batch_size); a negative one is refused
    msg = one_error(*run(capsys, "pipeline", "--model", tiny_ckpt, "--headline", "--gen-batch-size", -1,
                         "--out", tmp_path / "o"), "--gen-batch-size")
    assert "--n-boot" not in msg and "--batch-size " not in msg.replace("--gen-batch-size", "")


def test_d25_align_with_every_row_too_long_names_the_data_not_a_temp_file(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "org"
    msg = one_error(*run(capsys, "align", "--model", tiny_ckpt, "--self-n", 0, "--refuse-n", 4, "--comply-n", 1,
                         "--train-max-length", 4, "--device", "cpu", "--out", out))
    assert "harmprune-align-" not in msg and "align data" in msg
    assert not out.exists() and not leftovers(tmp_path)


def test_d26_empty_preset_is_refused(tiny_ckpt, tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, "pipeline", "--model", tiny_ckpt, "--preset", "", "--out", tmp_path / "o"), "--preset")



def test_d26_empty_prompt_is_refused_naming_the_row(tiny_ckpt, tmp_path, capsys, nothing_loads):
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "question?"}, {"prompt": "  "}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": ""}]}])
    for f, needle in ((plain, "row 2: the prompt (field 'prompt') is empty"),
                      (chat, "row 1: the prompt (the user turn")):
        one_error(*run(capsys, "eval", "harm", "--model", tiny_ckpt, "--prompts", f, "--judge", "keyword",
                       "--out", tmp_path / "o"), str(f), needle)
    assert not (tmp_path / "o").exists()


def test_d26_prompt_longer_than_the_context_is_refused_before_generation(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import harmprune.evals.backends as backends

    monkeypatch.setattr(backends, "_hf_generate_batch", lambda *a, **k: pytest.fail("generation started"))
    long = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short?"}, {"prompt": "tell me more " * 120}])  # 3 x 512
    one_error(*run(capsys, "eval", "harm", "--model", tiny_ckpt, "--prompts", long, "--judge", "keyword",
                   "--max-new-tokens", 2, "--device", "cpu", "--out", tmp_path / "o"),
              "1 of 2 prompts are longer than the model's context of 512 tokens", "'tell me more")


def test_d26_lm_eval_tasks_without_the_lm_eval_part_are_refused(tiny_ckpt, tmp_path, capsys, nothing_loads):
    one_error(*run(capsys, "eval", "utility", "--model", tiny_ckpt, "--parts", "benign_nll", "--lm-eval-tasks",
                   "harmprune_mc", "--out", tmp_path / "o"), "--lm-eval-tasks harmprune_mc", "omits lm_eval")
    assert not (tmp_path / "o").exists()


def test_d19_lm_eval_tasks_are_checked_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch, nothing_loads):
    pytest.importorskip("lm_eval")
    argv = ["eval", "utility", "--model", tiny_ckpt, "--parts", "lm_eval", "--out", tmp_path / "o"]
    one_error(*run(capsys, *argv, "--lm-eval-tasks", "harmprune_mc", "no_such_task_xyz"),
              "unknown lm-eval task(s) no_such_task_xyz")
    import importlib.util as iu  # without lm-eval: said before the model loads, not in a note after the run

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    capsys.readouterr()
    with pytest.raises(AssertionError, match="a model was loaded"):
        main([str(a) for a in [*argv, "--lm-eval-tasks", "harmprune_mc"]])
    assert "harmprune: warning: --lm-eval-tasks harmprune_mc will be skipped: lm_eval is not installed" in \
        capsys.readouterr().err


@pytest.mark.parametrize("role", ["base", "harmful"])
def test_d26_zero_update_is_refused(role, pair, tmp_path, capsys, nothing_loads):
    """A copy of the aligned model as --base (or as a fine-tune of it): the update is zero, its MSO
    undefined; refused before anything loads, not reported as MSO n/a."""
    import shutil

    base, aligned, ft = pair
    copy = shutil.copytree(aligned, tmp_path / "copy")
    argv = (["subspace", "project", "--base", copy, "--aligned", aligned, "--finetuned", ft] if role == "base" else
            ["subspace", "overlap", "--base", base, "--aligned", aligned, "--harmful", copy, "--useful", ft])
    one_error(*run(capsys, *argv, "--out", tmp_path / "o", "--device", "cpu"), "identical weights",
              f"--{role} {copy}", "update between them is zero")
    assert not (tmp_path / "o").exists()


def test_d18_an_unbuilt_aligned_alias_is_resolved_before_the_base_arm(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """--aligned an alias not built yet: built (here: its cache is unusable, so refused) in the check
    step, not after the base model's whole arm."""
    import harmprune.recipes.compare_alignment as ca

    monkeypatch.setattr(ca, "load_model", lambda *a, **k: pytest.fail("the base arm started"))
    a_file = tmp_path / "cache"
    a_file.write_text("x")
    monkeypatch.setenv("HARMPRUNE_CACHE", str(a_file))
    one_error(*run(capsys, "compare-alignment", "--base", tiny_ckpt, "--aligned", "smollm2-135m-aligned",
                   "--out", tmp_path / "o"), "--aligned", "model cache of alias 'smollm2-135m-aligned'")
