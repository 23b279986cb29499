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
