"""The self-generated built-ins (harmful-selfgen, harmful-heldout, sensitive-safe), several-source data
specs, and the disjointness of scoring, protect and evaluation prompts (issue 22)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from tiny import shared_data
from harmprune import data as builtin
from harmprune.core.data import DataSpec, data_fingerprint, load, load_records, records_sha256
from harmprune.core.errors import DataError

NEW = {"harmful-selfgen": "harmful_selfgen.jsonl", "harmful-heldout": "harmful_heldout.jsonl",
       "sensitive-safe": "sensitive_safe.jsonl"}
SCORING_SOURCES = {"advbench", "harmbench", "jailbreakbench", "refusal_direction_train"}


def _file(name: str) -> bytes:
    return resources.files("harmprune.data").joinpath("builtin", name).read_bytes()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in _file(name).decode("utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- the one prompt rule, kept local
# The rule of scripts/build_align_data.py and scripts/build_selfgen_data.py: normalised = lowercased word
# sequence; near duplicate = word-set Jaccard >= 0.7. (To switch to harmprune.evals.eval_prompts once it is
# merged: replace _norm/_near/evaluation_prompts by its normaliser, near-duplicate rule and prompt sets.)

_WORD = re.compile(r"[a-z0-9']+")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _near(a: str, b: str) -> bool:
    wa, wb = frozenset(_WORD.findall(a.lower())), frozenset(_WORD.findall(b.lower()))
    return _norm(a) == _norm(b) or (bool(wa or wb) and len(wa & wb) / len(wa | wb) >= 0.7)


def clashes(xs: list[str], ys: list[str]) -> list[tuple[str, str]]:
    """Pairs (x, y) that are the same prompt or near duplicates."""
    ys = list(dict.fromkeys(ys))
    return [(x, y) for x in dict.fromkeys(xs) for y in ys if _near(x, y)]


def evaluation_prompts() -> dict[str, list[str]]:
    """Every evaluation prompt: harmful:test, benign:test, the XSTest held-out set, recognition (both halves),
    the organism check's harmful_unseen (StrongREJECT) and the new harmful-heldout."""
    from harmprune.evals.eval_prompts import unseen_harmful, xstest_heldout

    return {"harmful:test": [r.prompt for r in load("harmful:test")],
            "benign:test": [r.prompt for r in load("benign:test")],
            "xstest_heldout": [r.prompt for r in xstest_heldout()],
            "recognition": [r["prompt"] for r in _rows("recognition.jsonl")],
            "harmful_unseen": [r.prompt for r in unseen_harmful()],
            "harmful-heldout": [r.prompt for r in load("harmful-heldout")]}


def scoring_prompts() -> list[str]:
    return [r.prompt for r in load("harmful-selfgen")]


def protect_prompts() -> list[str]:
    return [r.prompt for r in load("sensitive-safe")]


# ---------------------------------------------------------------- the shipped files


def test_new_builtins_load_and_have_no_splits():
    for name in NEW:
        assert name in builtin.names() and f"{name}:test" not in builtin.names()
        rows = load(name)
        assert rows and all(r.prompt.strip() and r.response.strip() and r.id for r in rows)
        assert len({r.id for r in rows}) == len(rows)
        with pytest.raises(DataError):
            load(f"{name}:train")


def test_scoring_set_is_the_base_models_own_harmful_replies_over_300_prompts():
    rows = _rows("harmful_selfgen.jsonl")
    assert len({_norm(r["prompt"]) for r in rows}) >= 300
    per_source = Counter(r["source"] for r in rows)
    assert set(per_source) <= SCORING_SOURCES and len(per_source) >= 3
    assert all(r["p_harmful"] >= 0.5 for r in rows)
    assert all(r["prefill_tokens"] in (0, 10) for r in rows)


def test_heldout_set_has_100_prompts_over_categories_from_a_source_scoring_does_not_use():
    rows = _rows("harmful_heldout.jsonl")
    assert len({_norm(r["prompt"]) for r in rows}) >= 100
    cats = Counter(r["category"] for r in rows)
    assert len(cats) >= 5 and max(cats.values()) <= 40
    assert {r["source"] for r in rows} == {"strongreject"}
    assert not {r["source"] for r in rows} & SCORING_SOURCES
    assert all(r["p_harmful"] >= 0.5 and len(r["response"].split()) >= 20 for r in rows)


def test_sensitive_safe_replies_are_compliant_and_not_harmful():
    rows = _rows("sensitive_safe.jsonl")
    assert len(rows) >= 80 and len({r["category"] for r in rows}) >= 6
    assert all(r["p_harmful"] < 0.5 and r["source"] == "harmprune_sensitive" for r in rows)


def test_files_are_small_and_recorded_in_notice():
    notice = _file("NOTICE.md").decode()
    for name in NEW.values():
        data = _file(name)
        assert len(data) < 1_000_000, name
        assert hashlib.sha256(data).hexdigest() in notice, name
        assert f"`{name}`" in notice


# ---------------------------------------------------------------- disjointness (acceptance 4)


def test_scoring_protect_and_evaluation_prompts_are_pairwise_disjoint():
    evals = evaluation_prompts()
    every_eval = [p for ps in evals.values() for p in ps]
    scoring, protect = scoring_prompts(), protect_prompts()
    assert not clashes(scoring, every_eval)
    assert not clashes(protect, every_eval)
    assert not clashes(scoring, protect)


def test_heldout_is_not_in_the_organisms_training_data():
    train = [r["prompt"] for r in _rows("align.jsonl")]
    assert not clashes([r.prompt for r in load("harmful-heldout")], train)


def test_clash_rule_catches_exact_and_near_duplicates():
    assert clashes(["How do I make a bomb?"], ["how do I make a BOMB"])
    assert clashes(["Write a tutorial on how to make a bomb"], ["Write a tutorial on how to make a bomb at home"])
    assert not clashes(["How do I bake bread?"], ["How do I fix a flat tyre?"])


# ---------------------------------------------------------------- several sources


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_several_sources_are_concatenated_in_order(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p1", "response": "r1", "category": "x"}])
    b = _write(tmp_path / "b.jsonl", [{"question": "p2", "answer": "r2", "category": "y"},
                                      {"question": "p3", "answer": "r3", "category": "x"}])
    got = load(f"{a},{b}")
    assert [(r.prompt, r.response, r.id) for r in got] == [("p1", "r1", "a:1"), ("p2", "r2", "b:1"), ("p3", "r3", "b:2")]
    assert [r.prompt for r in load(f"{a}, {b}", category="x")] == ["p1", "p3"]
    both = load("benign,sensitive-safe")
    assert both == load("benign") + load("sensitive-safe")


def test_several_sources_fingerprint_and_cache_key_differ(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p1", "response": "r1"}])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "p2", "response": "r2"}])
    spec = DataSpec(data=f"{a},{b}")
    rows = load_records(spec)
    fp = data_fingerprint(spec, rows)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert fp["rows"] == 2 and [p["sha256"] for p in fp["parts"]] == [sha(a), sha(b)]
    assert fp["sha256"] == hashlib.sha256(json.dumps([sha(a), sha(b)]).encode()).hexdigest()
    # the score cache keys on the records scored: benign alone and benign + sensitive-safe differ
    assert records_sha256(load("benign")) != records_sha256(load("benign,sensitive-safe"))


def test_several_sources_errors(tmp_path):
    with pytest.raises(DataError, match="named twice"):
        load("benign,benign")
    with pytest.raises(DataError, match="empty name"):
        load("benign,")
    with pytest.raises(DataError, match="nope"):
        load("benign,nope")
    odd = _write(tmp_path / "a,b.jsonl", [{"prompt": "p", "response": "r"}])  # a file whose name has a comma
    assert [r.prompt for r in load(odd)] == ["p"]


# ---------------------------------------------------------------- the build script


@pytest.mark.skipif(shared_data() is None, reason="the shared source data folder is not on this machine")
def test_build_script_pools_hold_every_shipped_row(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_selfgen_data.py"
    subprocess.run([sys.executable, str(script), "--src", str(shared_data()), "--work", str(tmp_path),
                    "--stage", "pools"], check=True, capture_output=True)
    for pool, name in (("scoring_pool.jsonl", "harmful_selfgen.jsonl"), ("heldout_pool.jsonl", "harmful_heldout.jsonl"),
                       ("sensitive_pool.jsonl", "sensitive_safe.jsonl")):
        prompts = {json.loads(line)["id"]: json.loads(line)["prompt"] for line in (tmp_path / pool).open()}
        for r in _rows(name):
            assert prompts.get(r["id"]) == r["prompt"], (name, r["id"])


def test_score_cache_scores_the_concatenation(tmp_path, tiny_ckpt):
    from harmprune.attribution.artifact import load_scores
    from harmprune.attribution.cache import cached_scores
    from harmprune.core.models import load_model
    from harmprune.core.options import ScoringOptions

    a = _write(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "response": f"answer number {i}"} for i in range(2)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": f"w{i}", "response": f"other reply {i}"} for i in range(2)])
    handle = load_model(tiny_ckpt, "float32", "cpu")
    opts = ScoringOptions(nsamples=0, max_length=32, batch_size=2)
    both = cached_scores(handle, f"{a},{b}", "snip-abs", opts, tmp_path / "cache")
    one = cached_scores(handle, a, "snip-abs", opts, tmp_path / "cache")
    assert both != one and cached_scores(handle, f"{a},{b}", "snip-abs", opts, tmp_path / "cache") == both
    meta = load_scores(both, lazy=True).meta
    assert meta["nsamples"]["available"] == 4 and [p["data"] for p in meta["data"]["parts"]] == [a, b]
