"""`make prune` and `make sweep` end to end on a tiny checkpoint, checked against independent re-computation."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmprune.core.data import DataSpec, load_records
from harmprune.core.models import load_model
from harmprune.evals.nll import response_nll
from harmprune.pruning.checkpoint import load_mask, load_scores
from harmprune.recipes.pipeline import PipelineConfig, run_pipeline
from harmprune.pruning.select import select_prune_set
from harmprune.recipes.sweep import SweepConfig, recommend, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    harm = [{"prompt": f"how to do bad thing {i}", "response": f"step {i}: hurt them with {i} knives"} for i in range(6)]
    benign = [{"prompt": f"recipe {i}", "response": f"mix {i} eggs and bake it slowly"} for i in range(6)]
    held_out = [{"prompt": f"wreck cars {i}", "response": f"first {i}: break things"} for i in range(4)]  # judged prompts: none near a scored one
    return {"harm": _jsonl(tmp_path / "harm.jsonl", harm), "benign": _jsonl(tmp_path / "benign.jsonl", benign),
            "held_out": _jsonl(tmp_path / "held_out.jsonl", held_out)}


def _pipeline_cfg(tiny_ckpt, data, tmp_path, **kw):
    base = dict(model=tiny_ckpt, harm=data["harm"], benign=data["benign"], eval_harm=data["harm"],
                eval_benign=data["benign"], nsamples=4, max_length=48, batch_size=2, q=0.02, p=0.05,
                scores_dir=str(tmp_path / "scores"), out=str(tmp_path / "pruned"))
    return PipelineConfig(**{**base, **kw})


def _nll(model, tok, data_path):
    rows = load_records(DataSpec(data=data_path))
    return response_nll(model, tok, rows, fmt="auto", max_length=48, batch_size=8)["nll"]


def test_pipeline_hashes_the_model_once_and_reads_each_dataset_once(tiny_ckpt, data, tmp_path, monkeypatch):
    """One model handle, one read per dataset: counted at the only hash function and the only file parser."""
    import harmprune.core.data as core_data
    import harmprune.core.models as core_models

    hashes, reads = [], []
    real_hash, real_rows = core_models.model_hash, core_data._rows
    monkeypatch.setattr(core_models, "model_hash", lambda m: hashes.append(1) or real_hash(m))
    monkeypatch.setattr(core_data, "_rows", lambda src: reads.append(str(src.path or src.name)) or real_rows(src))
    held = {"eval_harm": _jsonl(tmp_path / "eval_harm.jsonl", [{"prompt": "p", "response": "bad r"}] * 2),
            "eval_benign": _jsonl(tmp_path / "eval_benign.jsonl", [{"prompt": "q", "response": "good r"}] * 2)}
    run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, **held))
    assert len(hashes) == 1
    assert sorted(reads) == sorted([data["harm"], data["benign"], held["eval_harm"], held["eval_benign"]])


def test_pipeline_checkpoint_table_and_cache(tiny_ckpt, data, tmp_path, monkeypatch):
    cfg = _pipeline_cfg(tiny_ckpt, data, tmp_path)
    out = run_pipeline(cfg)

    # the saved mask is the selection of the cached scores, and the checkpoint holds it
    score_dirs = sorted((tmp_path / "scores").glob("*/*"))
    assert len(score_dirs) == 2
    harm_dir = next(d for d in score_dirs if "-snip-n4-" in d.name)
    benign_dir = next(d for d in score_dirs if "-snip-abs-n4-" in d.name)
    harm, benign = load_scores(harm_dir), load_scores(benign_dir)
    expected, stats = select_prune_set(harm.tensors, benign.tensors, "snip", "snip-abs", 0.02, 0.05, "matrix")
    mask = load_mask(out)
    assert set(mask) == set(expected)
    assert all(torch.equal(mask[k].bool(), expected[k]) for k in mask)
    assert stats["total_pruned"] > 0

    # the before/after table agrees with an independent NLL of the original and of the saved checkpoint
    table = json.loads((out / "prune_config.json").read_text())["before_after"]["rows"]
    orig, tok = load_model(tiny_ckpt)
    pruned, _ = load_model(str(out))
    assert table["original"]["harmful_nll"] == pytest.approx(_nll(orig, tok, data["harm"]), rel=1e-5)
    assert table["pruned"]["harmful_nll"] == pytest.approx(_nll(pruned, tok, data["harm"]), rel=1e-5)
    assert table["pruned"]["benign_nll"] == pytest.approx(_nll(pruned, tok, data["benign"]), rel=1e-5)
    d_h = table["pruned"]["harmful_nll"] - table["original"]["harmful_nll"]
    assert table["pruned"]["d_harmful"] == pytest.approx(d_h)
    assert table["random"]["pruned"] == table["pruned"]["pruned"] == stats["total_pruned"]
    assert (out / "before_after.md").read_text().count("\n") >= 5

    # another q re-uses both score directories: scoring must not run again
    monkeypatch.setattr(sys.modules["harmprune.attribution.score"], "score",
                        lambda *a, **k: pytest.fail("scores were recomputed"))
    out2 = run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, q=0.05, out=str(tmp_path / "pruned2")))
    assert load_mask(out2)
    assert len(sorted((tmp_path / "scores").glob("*/*"))) == 2


def test_pipeline_cache_key_changes_with_settings(tiny_ckpt, data, tmp_path, monkeypatch):
    calls = []
    score_mod = sys.modules["harmprune.attribution.score"]
    real = score_mod.score
    monkeypatch.setattr(score_mod, "score", lambda cfg, *a, **kw: calls.append(cfg.out) or real(cfg, *a, **kw))
    run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, p=0.0))
    assert len(calls) == 1  # p = 0: no benign scores are needed
    run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, p=0.0, max_length=64, overwrite=True))
    assert len(calls) == 2 and calls[0] != calls[1]


def _row(q, p, variant, dh, db, base_b=2.0, pruned=10):
    spec = dh / db if db > 0 else (math.inf if dh > 0 else math.nan)
    return {"q": q, "p": p, "variant": variant, "pruned": pruned, "d_harmful": dh, "d_benign": db,
            "benign_rel": db / base_b, "specificity": spec}


def test_recommend_picks_most_specific_within_benign_bound():
    rows = [
        _row(1e-4, 0.01, "harm-specific", 0.02, 0.01),   # specificity 2, benign +0.5%
        _row(1e-3, 0.01, "harm-specific", 0.50, 0.05),   # specificity 10, benign +2.5%
        _row(1e-3, 0.00, "harm-specific", 3.00, 0.20),   # specificity 15 but benign +10%: excluded
        _row(1e-3, 0.01, "random", 0.90, 0.01),          # controls never recommended
        _row(1e-5, 0.01, "harm-specific", -0.01, 0.001),  # harm NLL fell: excluded
        _row(1e-5, 0.00, "harm-specific", 0.0, 0.0, pruned=0),
    ]
    best = recommend(rows, 0.05)
    assert (best["q"], best["p"]) == (1e-3, 0.01)
    assert recommend(rows, 0.2)["p"] == 0.0
    assert recommend(rows, 0.001) is None  # even the mildest point raises benign NLL by 0.5%
    # a point whose benign NLL fell is maximally specific
    assert recommend(rows + [_row(3e-5, 0.01, "harm-specific", 0.01, -0.01)], 0.05)["q"] == 3e-5
    # an effect floor drops specific-but-negligible points (a ratio of two tiny rises is noise)
    tiny = _row(1e-5, 0.01, "harm-specific", 0.002, 0.0001)  # specificity 20
    assert recommend(rows + [tiny], 0.05)["q"] == 1e-5
    assert recommend(rows + [tiny], 0.05, min_d_harmful=0.01)["q"] == 1e-3


def test_sweep_grid_controls_and_recommendation(tiny_ckpt, data, tmp_path):
    scores_dir = str(tmp_path / "scores")
    cfg = SweepConfig(model=tiny_ckpt, harm=data["harm"], benign=data["benign"], eval_harm=data["harm"],
                      eval_benign=data["benign"], nsamples=4, max_length=48, batch_size=2, qs=[0.01, 0.05],
                      ps=[0.0, 0.05], eval_nsamples=0, scores_dir=scores_dir, out=str(tmp_path / "sweep"))
    out = run_sweep(cfg)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3
    assert (out / "sweep.png").stat().st_size > 1000
    result = json.loads((out / "sweep.json").read_text())
    by = {(float(r["q"]), float(r["p"]), r["variant"]): r for r in rows}
    for q in (0.01, 0.05):
        for p in (0.0, 0.05):
            n = {int(by[(q, p, v)]["pruned"]) for v in ("harm-specific", "random", "magnitude")}
            assert len(n) == 1  # controls have the harm-specific set's size
    assert result["recommended"] == recommend(result["rows"], 0.05, 0.01)
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule, one line per (p, q)
    r = by[(0.05, 0.05, "harm-specific")]
    line = next(ln for ln in table if ln.startswith("| 0.05 | 0.05"))
    assert f"{float(r['d_harmful']):+.4f}" in line and f"{float(by[(0.05, 0.05, 'random')]['d_benign']):+.4f}" in line

    # the sweep's harm-specific point equals what `make prune` measures at the same (q, p)
    out_p = run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, q=0.05, p=0.05, scores_dir=scores_dir))
    table = json.loads((out_p / "prune_config.json").read_text())["before_after"]["rows"]
    assert float(by[(0.05, 0.05, "harm-specific")]["harmful_nll"]) == pytest.approx(table["pruned"]["harmful_nll"])


def test_pipeline_headline_writes_results_table_and_figure(tiny_ckpt, data, tmp_path, monkeypatch):
    """--headline: one model hash, results.json for original/pruned/random, table.md rendered from it, a PNG;
    the NLL table is the one a run without --headline writes (same numbers, same files besides)."""
    import harmprune.core.models as core_models
    from harmprune.evals import headline as H

    hashes = []
    real_hash = core_models.model_hash
    monkeypatch.setattr(core_models, "model_hash", lambda m: hashes.append(1) or real_hash(m))
    on = run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, headline=True, judge="keyword,classifier", limit=3,
                                    eval_harm=data["held_out"],
                                    max_new_tokens=3, prefill_attack=2, gen_batch_size=2, out=str(tmp_path / "on")))
    assert len(hashes) == 1
    doc = json.loads((on / H.RESULTS_FILE).read_text())
    assert (on / H.TABLE_FILE).read_text() == H.render_table(doc)
    assert (on / H.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(doc["variants"]) == ["original", "pruned", "random"]
    before_after = json.loads((on / "prune_config.json").read_text())["before_after"]
    nlls = {k: (r["harmful_nll"], r["benign_nll"], r["pruned"]) for k, r in before_after["rows"].items()}
    assert {k: (r["harmful_nll"], r["benign_nll"], r["pruned"]) for k, r in doc["before_after"]["rows"].items()} == nlls
    assert doc["model"]["hash"]
    pruned = before_after["rows"]["pruned"]["pruned"]
    assert [v["pruned_weights"] for v in doc["variants"].values()] == [0, pruned, pruned] and pruned > 0
    for name, v in doc["variants"].items():
        for task in ("harm/none/keyword", "harm/prefill/keyword", "harm/none/classifier", "harm/prefill/classifier"):
            assert v[task]["samples"] == 3  # --limit held-out harmful prompts
        # the benign NLL of the headline is the NLL table's measurement, not a second one
        assert v["utility/benign_nll"]["nll"] == before_after["rows"][name]["benign_nll"]
        assert {"utility/xstest", "utility/corpus"} <= set(v)
    lines = [json.loads(x) for x in (on / "headline_samples.jsonl").read_text().splitlines()]
    forced = [x for x in lines if x["task"] == "harm/prefill"]
    assert forced and all(x["prefill"] and x["response"].startswith(x["prefill"]) for x in forced)

    off = run_pipeline(_pipeline_cfg(tiny_ckpt, data, tmp_path, eval_harm=data["held_out"], out=str(tmp_path / "off")))
    assert {p.name for p in on.iterdir()} - {p.name for p in off.iterdir()} == \
        {H.RESULTS_FILE, H.TABLE_FILE, H.PLOT_FILE, "headline_samples.jsonl"}
    assert json.loads((off / "prune_config.json").read_text())["before_after"] == before_after
    assert (off / "before_after.md").read_text() == (on / "before_after.md").read_text()


def _make_n(target, *args):
    """The harmprune command line ``make -n TARGET`` would run (continuation lines joined)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "HEADLINE", "BASE", "ALIGNED")}
    out = subprocess.run(["make", "-n", target, "VENV=/nonexistent-venv", *args], cwd=Path(__file__).parents[1],
                         env=env, capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
    return " ".join(next(ln for ln in out.splitlines() if f"harmprune {target}" in ln or " pipeline " in ln).split())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_prune_runs_the_organism_with_the_headline_unless_a_model_is_given():
    organism = _make_n("prune")
    assert "--model smollm2-135m-aligned " in organism
    headline = ("--headline --judge keyword,classifier --judge-device auto --limit 32 --max-new-tokens 48 "
                "--gen-batch-size 0 --eval-harm-extra none --corpus-tokens 8192")
    assert organism.endswith(headline)
    base = _make_n("prune", "MODEL=smollm2-135m-instruct")  # today's run: the same command, no headline
    assert "--headline" not in base
    assert base == organism.replace("smollm2-135m-aligned", "smollm2-135m-instruct").removesuffix(" " + headline)
    assert _make_n("prune", "MODEL=smollm2-135m-instruct", "HEADLINE=1").endswith(headline)
    assert "--headline" not in _make_n("prune", "HEADLINE=0")
    cmp = _make_n("compare-alignment")
    assert "--base smollm2-135m-instruct --aligned smollm2-135m-aligned" in cmp and "--judge keyword,classifier" in cmp


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_prune_passes_the_headline_judges_and_their_device():
    gpu = _make_n("prune", "HEADLINE_JUDGE=strongreject,keyword", "JUDGE_DEVICE=cuda")
    assert "--judge strongreject,keyword --judge-device cuda " in gpu
