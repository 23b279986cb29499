"""`make compare-alignment` on two tiny checkpoints, and its reading checked against plain references."""

import json
import math
import sys

import pytest
import torch

from harmprune.recipes import compare_alignment as C
from harmprune.recipes.pipeline import PipelineConfig, run_pipeline
from tiny import randomize_matrices, save_tiny, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")


def _plain_halving(base, curve):
    """Written out: walk the points by increasing fraction, return the first one at or below half."""
    if base is None or base <= 0:
        return None
    for fraction, score in sorted(curve):
        if score is not None and score * 2 <= base:
            return fraction
    return None


@pytest.mark.parametrize("base,curve", [
    (0.8, [(1e-5, 0.8), (3e-5, 0.7), (1e-4, 0.41), (3e-4, 0.4), (1e-3, 0.1)]),  # 0.4 = exactly half: reached
    (0.8, [(1e-3, 0.2), (1e-5, 0.75), (1e-4, 0.3), (3e-5, None)]),  # unsorted, one point unjudged
    (0.6, [(1e-5, 0.2), (1e-4, 0.5), (1e-3, 0.1)]),  # not monotone: the smallest fraction wins
    (0.6, [(1e-5, 0.6), (1e-4, 0.5), (1e-3, 0.31)]),  # not reached
    (0.0, [(1e-5, 0.0)]),  # nothing to halve
    (None, [(1e-5, 0.1)]),
])
def test_halving_fraction_matches_a_plain_reference(base, curve):
    assert C.halving_fraction(base, curve) == _plain_halving(base, curve)


def test_halving_fraction_on_a_synthetic_curve():
    """Harmfulness 0.9 * exp(-f / 2e-4) on a log grid: halved from f = 2e-4 * ln 2 = 1.386e-4 on."""
    grid = [10 ** (-6 + k / 4) for k in range(13)]  # 1e-6 .. 1e-3
    curve = [(f, 0.9 * math.exp(-f / 2e-4)) for f in grid]
    expected = min(f for f in grid if f >= 2e-4 * math.log(2))
    assert C.halving_fraction(0.9, curve) == expected == _plain_halving(0.9, curve)


def test_specificity_follows_the_pipeline_rule():
    assert C.specificity(0.04, 0.01) == pytest.approx(4.0)
    assert C.specificity(0.01, -0.001) == math.inf and math.isnan(C.specificity(-0.01, 0.0))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_alignment_end_to_end(tmp_path, tok, monkeypatch):
    harm = _jsonl(tmp_path / "harm.jsonl", [{"prompt": f"how to do bad thing {i}", "response": f"step {i}: hurt them "
                                             f"with {i} knives", "category": "ab"[i % 2]} for i in range(6)])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": f"recipe {i}", "response": f"mix {i} eggs and bake it"}
                                                for i in range(6)])
    aligned = tiny_llama(tok)
    randomize_matrices(aligned, torch.Generator().manual_seed(1))
    paths = {"base": save_tiny(tmp_path / "base", tiny_llama(tok), tok),
             "aligned": save_tiny(tmp_path / "aligned", aligned, tok)}
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": f"wreck cars {i}", "response": f"first {i}: break things",
                                             "category": "ab"[i % 2]} for i in range(4)])  # none near a scored one
    common = dict(harm=harm, benign=benign, eval_harm=held, eval_benign=benign, nsamples=4, max_length=48,
                  batch_size=2, p=0.05, scores_dir=str(tmp_path / "scores"))
    score_mod = sys.modules["harmprune.attribution.score"]
    calls, real = [], score_mod.score
    monkeypatch.setattr(score_mod, "score", lambda cfg, *a, **kw: calls.append(cfg.out) or real(cfg, *a, **kw))
    cfg = C.CompareAlignmentConfig(base=paths["base"], aligned=paths["aligned"], qs=[0.01, 0.05], q=0.02,
                                   judge="keyword,classifier", limit=4, max_new_tokens=3, prefill_attack=2,
                                   gen_batch_size=2, out=str(tmp_path / "cmp"), eval_harm_extra=held, **common)
    out = C.run_compare_alignment(cfg)
    assert len(calls) == 4  # harm + benign scores, once per model

    doc = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text() == C.render(doc)
    assert (out / C.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(doc["models"]) == ["base", "aligned"] and doc["data"]["prompts"] == 4
    assert doc["data"]["harmful_sets"][held]["selected"] == 4  # --eval-harm-extra: judged like the main set
    for m in doc["models"].values():
        assert m["original"]["harm_sets"][held]["none"]["keyword"]["samples"] == 4
        assert all(p["harm_sets"][held]["prefill"]["classifier"]["samples"] == 4 for p in m["points"])
        assert all(p["xstest"]["samples"] == 4 and 0 <= p["xstest"]["compliance"] <= 1
                   for p in [m["original"], *m["points"]])  # XSTest at every point
    assert "(c) second held-out harmful set" in (out / "table.md").read_text()
    assert "(d) XSTest safe compliance" in (out / "table.md").read_text()
    for role, m in doc["models"].items():
        assert [p["q"] for p in m["points"]] == [0.01, 0.02, 0.05]  # --q joins the grid
        assert m["original"]["harm"]["none"]["keyword"]["samples"] == 4
        for j in ("keyword", "classifier"):
            base = m["original"]["harm"]["prefill"][j]["score"]
            curve = [(p["fraction"], p["harm"]["prefill"][j]["score"]) for p in m["points"]]
            assert m["halving"][j] == _plain_halving(base, curve)

    # each point is what `make prune` measures at the same q, on the same model with the same cached scores
    pruned = run_pipeline(PipelineConfig(model=paths["aligned"], q=0.02, out=str(tmp_path / "p"), **common))
    row = json.loads((pruned / "prune_config.json").read_text())["before_after"]["rows"]["pruned"]
    point = doc["models"]["aligned"]["points"][1]
    assert point["pruned"] == row["pruned"] and point["d_harmful"] == pytest.approx(row["d_harmful"])
    assert point["d_benign"] == pytest.approx(row["d_benign"])
    assert len(calls) == 4  # the pipeline re-used the cached scores
    line = next(ln for ln in (out / "table.md").read_text().splitlines() if ln.startswith("| 0.02 **(--q)**"))
    assert f"{point['d_harmful']:+.4f}" in line
