"""harmprune ablate: overlap math, planted shared weights, transfer vs direct measurement, parsing, report."""

from __future__ import annotations

import json
import math
import re

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
import torch

from harmprune.core.targets import layer_index, module_type
from harmprune.pruning import masks as overlap
from harmprune.recipes.ablation import curves, distribution, report, transfer
from harmprune.recipes.ablation.run import AblateConfig, ablate, group_categories
from harmprune.core.data import Record
from harmprune.evals.nll import response_nll
from harmprune.pruning.apply import masked
from harmprune.pruning.select import random_control, select_prune_set

SHAPES = {"model.layers.0.mlp.down_proj.weight": (8, 16), "model.layers.1.self_attn.q_proj.weight": (16, 16)}


# ---------------------------------------------------------------- overlap math


def test_expected_intersection_hand_case():
    # |A| = 2, |B| = 3 in N = 6: E|A∩B| = 2*3/6 = 1; a second matrix adds 1*1/4
    assert overlap.expected_intersection({"x": 2, "y": 1}, {"x": 3, "y": 1}, {"x": 6, "y": 4}) == pytest.approx(1.25)


def test_expected_intersection_exact_enumeration():
    # All 3-subsets B of a 5-set against a fixed 2-set A: mean |A∩B| = 2*3/5
    from itertools import combinations

    inter = [len({0, 1} & set(b)) for b in combinations(range(5), 3)]
    assert sum(inter) / len(inter) == pytest.approx(overlap.expected_intersection({"x": 2}, {"x": 3}, {"x": 5}))


def test_expected_intersection_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    n, a, b, trials = 50, 10, 20, 4000
    total = 0
    for _ in range(trials):
        pa = torch.randperm(n, generator=gen)[:a]
        pb = torch.randperm(n, generator=gen)[:b]
        total += len(set(pa.tolist()) & set(pb.tolist()))
    assert total / trials == pytest.approx(overlap.expected_intersection({"x": a}, {"x": b}, {"x": n}), rel=0.05)


def test_jaccard_and_overlap_coefficient_hand_case():
    a = {"w": torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)}
    b = {"w": torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)}
    assert overlap.jaccard(a, b) == pytest.approx(2 / 5)
    assert overlap.overlap_coefficient(a, b) == pytest.approx(2 / 3)
    po = overlap.pair_overlap(a, b)
    assert po["expected_intersection"] == pytest.approx(3 * 4 / 6)
    assert po["jaccard_random"] == pytest.approx(2 / (3 + 4 - 2))
    assert overlap.difference(a, b)["w"].tolist() == [True, False, False, False, False, False]
    assert overlap.union([a, b])["w"].tolist() == [True] * 5 + [False]


# ---------------------------------------------------------------- planted structure


def _scores(planted: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Signed-SNIP-style scores: small noise, and strongly negative (= important) at the planted indices."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        s = 0.01 * torch.randn(shape, generator=g)
        s.view(-1)[planted[name]] = -5.0
        out[name] = s
    return out


def _benign(seed: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}


@pytest.mark.parametrize("shared", [True, False])
def test_planted_shared_weights_show_in_overlap(shared):
    # q = 1/32 takes k = 4 of the 128-weight matrix and 8 of the 256-weight one: exactly the planted weights
    pa = {n: list(range(3, 3 + 4 * (s[0] * s[1] // 128) * 7, 7)) for n, s in SHAPES.items()}
    pb = pa if shared else {n: [i + 2 for i in v] for n, v in pa.items()}
    sets = {}
    for cat, planted, seed in (("A", pa, 1), ("B", pb, 2)):
        sets[cat] = select_prune_set(_scores(planted, seed), None, "snip", None, q=1 / 32, p=0.0)[0]
        assert {n: m.view(-1).nonzero().flatten().tolist() for n, m in sets[cat].items()} == planted
    om = overlap.overlap_matrix(sets)
    j, jr = om["jaccard"][0][1], om["jaccard_random"][0][1]
    assert jr == pytest.approx((4 * 4 / 128 + 8 * 8 / 256) / (24 - (4 * 4 / 128 + 8 * 8 / 256)))
    if shared:
        assert om["intersection"][0][1] == 12 and j == 1.0
        assert om["jaccard_ratio"][0][1] > 20
    else:
        assert om["intersection"][0][1] == 0 and j == 0.0 and om["jaccard_ratio"][0][1] == 0.0


def test_random_sets_overlap_like_expectation():
    base = {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}
    for n in base:
        base[n].view(-1)[:40] = True
    obs = [overlap.intersection(random_control(base, s), random_control(base, s + 1000)) for s in range(200)]
    exp = overlap.expected_intersection(overlap.sizes(base), overlap.sizes(base), overlap.numels(base))
    assert sum(obs) / len(obs) == pytest.approx(exp, rel=0.1)


# ---------------------------------------------------------------- transfer vs direct computation


def _records(tag: str, n: int) -> list[Record]:
    return [Record(prompt=f"{tag} question {i}", response=f"{tag} answer {i} " + tag * (i + 1), category=tag)
            for i in range(n)]


def test_transfer_matrix_matches_direct_masked_nll(llama, tok):
    names = [n for n, _ in llama.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    params = dict(llama.named_parameters())
    g = torch.Generator().manual_seed(0)
    sets = {c: {n: torch.rand(params[n].shape, generator=g) < 0.2 for n in names} for c in ("a", "b")}
    rows = {"a": _records("a", 3), "b": _records("b", 3)}
    m = transfer.NLLMeasure(fmt="chat", max_length=64, batch_size=2)
    base = transfer.measure_all(llama, tok, rows, m)
    tr = transfer.transfer_matrix(llama, tok, sets, rows, m, base, progress=False)
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    for i, a in enumerate(("a", "b")):
        for j, b in enumerate(("a", "b")):
            with masked(llama, sets[a]):
                direct = response_nll(llama, tok, rows[b], fmt="chat", max_length=64)["nll"]
            plain = response_nll(llama, tok, rows[b], fmt="chat", max_length=64)["nll"]
            assert tr["effect"][i][j] == pytest.approx(direct - plain, abs=1e-5)
            assert tr["value"][i][j] == pytest.approx(direct, abs=1e-5)
    assert any(abs(x) > 1e-3 for r in tr["effect"] for x in r)  # pruning 20% changes something
    anb = transfer.a_not_b_matrix(llama, tok, sets, rows, m, base, progress=False)
    with masked(llama, overlap.difference(sets["a"], sets["b"])):
        direct_b = response_nll(llama, tok, rows["b"], fmt="chat", max_length=64)["nll"]
        direct_a = response_nll(llama, tok, rows["a"], fmt="chat", max_length=64)["nll"]
    assert anb["on_b"][0][1] == pytest.approx(direct_b - base["b"], abs=1e-5)
    assert anb["on_a"][0][1] == pytest.approx(direct_a - base["a"], abs=1e-5)
    assert anb["on_b"][0][0] is None
    assert all(torch.equal(before[n], p) for n, p in llama.named_parameters())  # everything restored


# ---------------------------------------------------------------- parsing, curves, grouping


@pytest.mark.parametrize("name,layer,mtype", [
    ("model.layers.3.mlp.down_proj.weight", 3, "down_proj"),
    ("model.layers.12.self_attn.q_proj.weight", 12, "q_proj"),
    ("transformer.h.3.attn.c_attn.weight", 3, "c_attn"),
    ("transformer.h.10.mlp.c_fc.weight", 10, "c_fc"),
    ("gpt_neox.layers.7.attention.query_key_value.weight", 7, "query_key_value"),
    ("model.layers.2.block_sparse_moe.experts.5.w1.weight", 2, "w1"),
    ("lm_head.weight", None, "lm_head"),
])
def test_layer_and_module_type_parsing(name, layer, mtype):
    assert layer_index(name) == layer
    assert module_type(name) == mtype
    assert module_type(name.replace(".weight", ".bias"), bias_apart=True) == mtype + ".bias" != module_type(name)


def test_distribution_counts():
    mask = {"transformer.h.0.attn.c_attn.weight": torch.tensor([True, False, True, False]),
            "transformer.h.1.attn.c_attn.weight": torch.tensor([True, False]),
            "transformer.h.1.mlp.c_fc.weight": torch.tensor([False, False])}
    d = distribution.distribution(mask)
    assert d["total"] == 3
    assert d["by_layer"]["0"] == {"pruned": 2, "numel": 4, "share": 2 / 3, "density": 0.5}
    assert d["by_layer"]["1"]["pruned"] == 1 and d["by_layer"]["1"]["numel"] == 4
    assert d["by_type"]["c_attn"]["pruned"] == 3 and d["by_type"]["c_fc"]["pruned"] == 0


def test_fraction_to_reach_interpolates_in_log_x():
    pts = [{"fraction": 1e-4, "harm_effect": 0.0}, {"fraction": 1e-2, "harm_effect": 1.0}]
    assert curves.fraction_to_reach(pts, 0.5) == pytest.approx(1e-3)
    assert curves.fraction_to_reach(pts, 2.0) is None
    assert curves.fraction_to_reach(pts, -1.0) == pytest.approx(1e-4)


def test_group_categories_merges_and_skips():
    groups, notes = group_categories({"a": 10, "b": 9, "c": 3, "d": 5}, [], 8)
    assert groups == {"a": ["a"], "b": ["b"], "other (c, d)": ["c", "d"]}
    assert notes
    groups, notes = group_categories({"a": 10, "b": 9, "c": 3}, [], 8)
    assert groups == {"a": ["a"], "b": ["b"]} and "skipped c" in notes[0]


# ---------------------------------------------------------------- end to end on a tiny model


def _numbers_of(obj, out):
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        out.append(obj)
    elif isinstance(obj, str):
        try:
            out.append(float(obj))
        except ValueError:
            pass
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_of(k, out)
            _numbers_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers_of(v, out)
    return out


def _strings_of(obj, out):
    if isinstance(obj, str):
        out.add(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _strings_of(k, out)
            _strings_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _strings_of(v, out)
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ablate_end_to_end_report_numbers_come_from_results(tmp_path, tiny_ckpt):
    harm = [{"prompt": f"how to do {c} thing {i}", "response": f"step {i}: {c} " * 3, "category": c}
            for c in ("alpha", "beta", "gamma") for i in range(6)]
    benign = [{"prompt": f"tell me about fruit {i}", "response": f"fruit {i} is tasty"} for i in range(6)]
    data, bdata = _write_jsonl(tmp_path / "harm.jsonl", harm), _write_jsonl(tmp_path / "benign.jsonl", benign)
    cfg = AblateConfig(model=tiny_ckpt, data=data, benign=bdata, eval_benign=bdata, q=0.02, p=0.01, category_nsamples=3,
                       nsamples=3, min_rows=3, eval_per_category=2, eval_benign_nsamples=3,
                       curve_qs=[0.01, 0.05], harm_targets=[0.001, 0.01], max_length=48, batch_size=2,
                       scores_dir=str(tmp_path / "scores"), out=str(tmp_path / "out"), compare_model=tiny_ckpt)
    out = ablate(cfg)
    res = json.loads((out / "results.json").read_text())
    m = next(iter(res["models"].values()))
    assert m["overlap"]["names"] == ["alpha", "beta", "gamma"]
    assert m["transfer"]["rows"][-1] == "random control" and len(m["transfer"]["effect"]) == 4
    assert len(m["a_not_b"]["on_b"]) == 3 and len(m["curves"]["union"]) == 2
    for f in res["figures"]:
        assert (out / f).stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Conclusion" in text
    # every number in the report is a value of results.json (at the printed precision)
    for s in sorted(_strings_of(res, set()), key=len, reverse=True):
        if len(s) > 2 and not re.fullmatch(r"[-+.\de]+", s):
            text = text.replace(s, " ")
    values = _numbers_of(res, [])
    tokens = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)
    assert tokens
    for t in tokens:
        x = float(t)
        assert any(math.isclose(x, float(f"{v:.3g}"), rel_tol=1e-9, abs_tol=1e-12) or x == v for v in values), t
    # a second run re-uses the cached scores
    cfg.overwrite, cfg.compare_model = True, None
    before = sorted(p.stat().st_mtime for p in (tmp_path / "scores").rglob("scores.safetensors"))
    ablate(cfg)
    assert sorted(p.stat().st_mtime for p in (tmp_path / "scores").rglob("scores.safetensors")) == before


def test_ablate_reuses_the_pipelines_benign_scores(tmp_path, tiny_ckpt, monkeypatch):
    """One score cache: the benign |SNIP| scores `make prune` computed are the ones `make ablation` reads."""
    import sys

    from harmprune.recipes.pipeline import PipelineConfig, run_pipeline

    harm = [{"prompt": f"how to do {c} thing {i}", "response": f"step {i}: {c} " * 3, "category": c}
            for c in ("alpha", "beta") for i in range(6)]
    benign = [{"prompt": f"tell me about fruit {i}", "response": f"fruit {i} is tasty"} for i in range(6)]
    data, bdata = _write_jsonl(tmp_path / "harm.jsonl", harm), _write_jsonl(tmp_path / "benign.jsonl", benign)
    shared = dict(model=tiny_ckpt, benign=bdata, eval_benign=bdata, nsamples=3, max_length=48, batch_size=2,
                  scores_dir=str(tmp_path / "scores"))
    run_pipeline(PipelineConfig(harm=data, eval_harm=data, q=0.02, p=0.05, out=str(tmp_path / "pruned"), **shared))
    score_mod = sys.modules["harmprune.attribution.score"]
    real, methods = score_mod.score, []
    monkeypatch.setattr(score_mod, "score", lambda cfg, *a, **k: methods.append(cfg.method) or real(cfg, *a, **k))
    ablate(AblateConfig(data=data, q=0.02, p=0.05, category_nsamples=3, min_rows=3, eval_per_category=2,
                        eval_benign_nsamples=3, curve_qs=[0.05], harm_targets=[0.01], a_not_b=False,
                        out=str(tmp_path / "ablation"), **shared))
    assert methods == ["snip", "snip"]  # the two categories; benign snip-abs came from the cache
