"""Selection against hand-computed masks and a plain brute-force sort."""

import warnings

import pytest
import torch
from torch import nn

from harmprune.core.errors import HarmpruneError
from harmprune.pruning.apply import apply_mask, masked
from harmprune.pruning.select import (PruneWarning, count_k, harm_specific, importance, magnitude_control,
                                      random_control, select_prune_set, topk_mask)

T, F = True, False


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


def eq(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def brute_topk(imp: dict, k: int) -> dict:
    """Reference: concatenate in key order, stable descending sort, first k."""
    flat = torch.cat([t.reshape(-1).float() + 0.0 for t in imp.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    m[order] = True
    out, o = {}, 0
    for n, t in imp.items():
        out[n] = m[o:o + t.numel()].reshape(t.shape)
        o += t.numel()
    return out


# ---- directions ---------------------------------------------------------------------------------

S = torch.tensor([[0.5, -2.0, 1.0], [-0.1, 3.0, -2.0]])


def test_signed_snip_takes_most_negative_first():
    # -S = [[-0.5, 2, -1], [0.1, -3, 2]]; top 3 = 2 (idx 1), 2 (idx 5), 0.1 (idx 3)
    m = topk_mask({"w": importance(S, "snip")}, 0.5, "matrix")
    assert torch.equal(m["w"], B([[F, T, F], [T, F, T]]))


def test_abs_methods_take_largest_first():
    # S itself: top 3 = 3 (idx 4), 1 (idx 2), 0.5 (idx 0)
    for method in ("snip-abs", "wanda"):
        m = topk_mask({"w": importance(S, method)}, 0.5, "matrix")
        assert torch.equal(m["w"], B([[T, F, T], [F, T, F]]))


# ---- scopes and ties ----------------------------------------------------------------------------

def test_matrix_ties_lowest_flat_index():
    imp = {"w": torch.tensor([[0.0, 2, 1], [2, 1, 1]])}
    # k = 3: both 2s (idx 1, 3), then the first of the 1s (idx 2)
    assert torch.equal(topk_mask(imp, 0.5, "matrix")["w"], B([[F, T, T], [T, F, F]]))
    all_equal = {"w": torch.full((1, 4), -1.0)}
    assert torch.equal(topk_mask(all_equal, 0.5, "matrix")["w"], B([[T, T, F, F]]))


def test_signed_zeros_tie():
    imp = {"w": torch.tensor([[-0.0, 0.0, 0.0, -1.0]])}
    assert torch.equal(topk_mask(imp, 0.5, "matrix")["w"], B([[T, T, F, F]]))
    assert torch.equal(topk_mask(imp, 0.5, "global")["w"], B([[T, T, F, F]]))


def test_row_scope_per_output_row():
    imp = {"w": torch.tensor([[1.0, 4, 2, 3], [5, 5, 0, 5]])}
    # k = 2 per row; row 1 has three 5s: columns 0 and 1 win
    assert torch.equal(topk_mask(imp, 0.5, "row")["w"], B([[F, T, F, T], [T, T, F, F]]))


def test_global_scope_key_order_then_index():
    a = torch.tensor([[1.0, 5], [3, 0]])
    b = torch.tensor([[5.0, 5, 4]])
    # k = floor(0.3 * 7) = 2; three 5s tie: a's (earlier key) first, then b's lowest index
    m = topk_mask({"a": a, "b": b}, 0.3, "global")
    assert torch.equal(m["a"], B([[F, T], [F, F]])) and torch.equal(m["b"], B([[T, F, F]]))
    m = topk_mask({"b": b, "a": a}, 0.3, "global")
    assert torch.equal(m["a"], B([[F, F], [F, F]])) and torch.equal(m["b"], B([[T, T, F]]))
    m = topk_mask({"a": a, "b": b}, 0.5, "global")  # k = 3
    assert torch.equal(m["a"], B([[F, T], [F, F]])) and torch.equal(m["b"], B([[T, T, F]]))


def test_k_is_floor_of_the_decimal_fraction():
    assert count_k(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert count_k(0.5, 7) == 3 and count_k(1e-5, 99_999) == 0 and count_k(1.0, 5) == 5
    with pytest.raises(ValueError):
        count_k(1.5, 10)


def test_k_zero_matrices_are_reported():
    scores = {"small": torch.tensor([[1.0, 2, 3]]), "big": torch.arange(10.0).reshape(2, 5)}
    mask, stats = _quiet(select_prune_set, scores, None, "snip-abs", None, 0.2, 0.0, "matrix")
    assert torch.equal(mask["small"], B([[F, F, F]]))
    assert torch.equal(mask["big"], B([[F, F, F, F, F], [F, F, F, T, T]]))
    assert stats["k_zero"]["harm"] == ["small"]
    assert any("k = 0 in 1 of 2" in w for w in stats["warnings"])
    # row scope: 5-long rows at 0.2 give k = 1 each, 3-long rows k = 0
    mask, stats = _quiet(select_prune_set, scores, None, "snip-abs", None, 0.2, 0.0, "row")
    assert torch.equal(mask["big"], B([[F, F, F, F, T], [F, F, F, F, T]]))
    assert stats["k_zero"]["harm"] == ["small"]


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneWarning)
        return fn(*a, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_global_equals_brute_force_sort(seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(20):
        n_mats = int(torch.randint(1, 6, (1,), generator=g))
        imp = {}
        for i in range(n_mats):
            shape = tuple(int(v) for v in torch.randint(1, 40 if trial % 5 == 0 else 9, (2,), generator=g))
            kind = trial % 4
            if kind == 0:  # heavy ties
                t = torch.randint(-2, 3, shape, generator=g).float()
            elif kind == 1:  # wide dynamic range: many radix bins
                t = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-30, 30, shape, generator=g)
            elif kind == 2:  # ties inside one low-bits bin, signed zeros
                t = torch.randint(0, 3, shape, generator=g).float() * 1e-3 - 1e-3
                t[t == 0] = -0.0
            else:
                t = torch.randn(shape, generator=g)
            imp[f"m{i}"] = t
        total = sum(t.numel() for t in imp.values())
        for frac in (0.0, float(torch.rand(1, generator=g)), 0.5, 1.0, 1 / total):
            expect = brute_topk(imp, count_k(frac, total))
            assert eq(topk_mask(imp, frac, "global"), expect), (seed, trial, frac)


def test_matrix_and_row_equal_brute_force():
    g = torch.Generator().manual_seed(7)
    for _ in range(30):
        t = torch.randint(-3, 4, (int(torch.randint(1, 7, (1,), generator=g)), 6), generator=g).float()
        frac = float(torch.rand(1, generator=g))
        assert torch.equal(topk_mask({"w": t}, frac, "matrix")["w"], brute_topk({"w": t}, count_k(frac, t.numel()))["w"])
        rows = torch.stack([brute_topk({"r": r}, count_k(frac, 6))["r"] for r in t])
        assert torch.equal(topk_mask({"w": t}, frac, "row")["w"], rows)
    # long rows exercise the small-k / large-k fast paths, with ties
    for t in (torch.randint(-5, 6, (3, 700), generator=g).float(), torch.randn(2, 900, generator=g)):
        for frac in (0.001, 0.01, 0.2, 0.5, 0.99, 0.999):
            assert torch.equal(topk_mask({"w": t}, frac, "matrix")["w"],
                               brute_topk({"w": t}, count_k(frac, t.numel()))["w"]), frac
            rows = torch.stack([brute_topk({"r": r}, count_k(frac, t.shape[1]))["r"] for r in t])
            assert torch.equal(topk_mask({"w": t}, frac, "row")["w"], rows), frac


# ---- set difference -----------------------------------------------------------------------------

HARM = {"w": torch.tensor([[-3.0, -1, 2], [-2, 0, -0.5]])}   # snip: importance [[3,1,-2],[2,0,.5]]
BENIGN = {"w": torch.tensor([[9.0, 0, 0], [0, 0, 1]])}       # snip-abs


def test_harm_specific_set_difference():
    harm_imp = {"w": importance(HARM["w"], "snip")}
    benign_imp = {"w": importance(BENIGN["w"], "snip-abs")}
    sel = harm_specific(harm_imp, benign_imp, 0.5, 0.17, "matrix")  # k_harm = 3, k_benign = 1
    assert torch.equal(sel.harm_top["w"], B([[T, T, F], [T, F, F]]))
    assert torch.equal(sel.benign_top["w"], B([[T, F, F], [F, F, F]]))
    assert torch.equal(sel.mask["w"], B([[F, T, F], [T, F, F]]))
    assert sel.warnings == []


def test_p_zero_keeps_harm_top_and_warns_about_super_weights():
    with pytest.warns(PruneWarning, match="super weights"):
        mask, stats = select_prune_set(HARM, None, "snip", None, 0.5, 0.0, "matrix")
    assert torch.equal(mask["w"], B([[T, T, F], [T, F, F]]))
    assert any("super weights" in w for w in stats["warnings"])
    with pytest.raises(ValueError):
        select_prune_set(HARM, None, "snip", None, 0.5, 0.1, "matrix")


def test_select_prune_set_stats():
    mask, stats = select_prune_set(HARM, BENIGN, "snip", "snip-abs", 0.5, 0.17, "matrix")
    row = stats["per_matrix"]["w"]
    assert (row["harm_top"], row["benign_top"], row["pruned"], row["numel"]) == (3, 1, 2, 6)
    assert stats["total_pruned"] == 2 and stats["per_module_type"] == {"w": 2}


# ---- controls -----------------------------------------------------------------------------------

def _some_mask():
    g = torch.Generator().manual_seed(1)
    return {"a": torch.rand(40, 50, generator=g) < 0.01,   # sparse: rejection sampling path
            "b": torch.rand(8, 9, generator=g) < 0.6,      # dense: permutation path
            "c": torch.zeros(3, 3, dtype=torch.bool)}


def test_random_control_counts_and_determinism():
    mask = _some_mask()
    r1, r2 = random_control(mask, seed=3), random_control(mask, seed=3)
    assert eq(r1, r2)
    for n in mask:
        assert int(r1[n].sum()) == int(mask[n].sum()) and r1[n].dtype == torch.bool
    assert not eq(random_control(mask, seed=4), r1)
    # a matrix's control does not depend on which other matrices are present
    assert torch.equal(random_control({"b": mask["b"]}, seed=3)["b"], r1["b"])


def test_random_control_is_uniform():
    m = {"w": B([[T, T, F, F, F, F, F, F, F, F]])}
    hits = sum(random_control(m, seed=s)["w"].float() for s in range(2000))
    assert hits.sum() == 4000
    assert bool((hits > 300).all() and (hits < 500).all()), hits  # expected 400 each


def test_magnitude_control_avoids_benign():
    W = {"w": torch.tensor([[0.1, -0.05, 3.0], [-0.2, 0.05, 0.0]])}
    mask = {"w": B([[F, F, T], [T, F, F]])}          # 2 to prune
    benign = {"w": B([[F, F, F], [F, F, T]])}        # the 0.0 entry is protected
    # smallest |W| outside benign: 0.05 (idx 1) and 0.05 (idx 4) tie -> both, lower index first
    got = magnitude_control(mask, W, benign)
    assert torch.equal(got["w"], B([[F, T, F], [F, T, F]]))
    assert torch.equal(magnitude_control(mask, W, None)["w"], B([[F, T, F], [F, F, T]]))
    mask3 = {"w": B([[T, T, T], [F, F, F]])}
    assert torch.equal(magnitude_control(mask3, W, benign)["w"], B([[T, T, F], [F, T, F]]))


def test_controls_through_select_prune_set():
    g = torch.Generator().manual_seed(2)
    harm = {n: torch.randn(6, 10, generator=g) for n in ("x.q_proj.weight", "x.down_proj.weight")}
    benign = {n: torch.rand(6, 10, generator=g) for n in harm}
    weights = {n: torch.randn(6, 10, generator=g) for n in harm}
    mask, stats = select_prune_set(harm, benign, "snip", "snip-abs", 0.2, 0.3, "matrix")
    benign_top = topk_mask(benign, 0.3, "matrix")
    for control in ("random", "magnitude"):
        c, cstats = select_prune_set(harm, benign, "snip", "snip-abs", 0.2, 0.3, "matrix", control, 5, weights)
        for n in harm:
            assert int(c[n].sum()) == int(mask[n].sum()) == cstats["per_matrix"][n]["harm_specific"]
        if control == "magnitude":
            assert not any(bool((c[n] & benign_top[n]).any()) for n in harm)


# ---- applying -----------------------------------------------------------------------------------

def test_apply_and_restore_bit_exact():
    lin = nn.Sequential(nn.Linear(4, 3))
    orig = lin[0].weight.detach().clone()
    m = {"0.weight": B([[T, F, F, F], [F, F, T, F], [F, F, F, F]])}
    with masked(lin, m):
        w = lin[0].weight.detach()
        assert w[0, 0] == 0 and w[1, 2] == 0 and torch.equal(w[~m["0.weight"]], orig[~m["0.weight"]])
    assert torch.equal(lin[0].weight, orig)
    apply_mask(lin, m, "scale", 0.5)
    assert torch.equal(lin[0].weight[m["0.weight"]], orig[m["0.weight"]] * 0.5)


def test_apply_refuses_ties_and_bad_masks(llama):
    emb = llama.get_input_embeddings().weight
    m = torch.zeros_like(emb, dtype=torch.bool)
    m[0, 0] = True
    with pytest.raises(HarmpruneError, match="tied"):
        apply_mask(llama, {"lm_head.weight": m})
    with pytest.raises(HarmpruneError, match="shape"):
        apply_mask(llama, {"model.layers.0.mlp.down_proj.weight": B([[T]])})
    with pytest.raises(HarmpruneError, match="not a parameter"):
        apply_mask(llama, {"nope.weight": B([[T]])})


class _Tracked(dict):
    """Scores mapping that records how many tensors it handed out are still alive at each access."""

    def __init__(self, data):
        super().__init__()
        self._data, self._refs, self.max_alive = data, [], 0
        self.shapes = {k: list(v.shape) for k, v in data.items()}  # as attribution.artifact.LazyTensors

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __contains__(self, k):
        return k in self._data

    def __getitem__(self, k):
        import weakref

        self.max_alive = max(self.max_alive, sum(r() is not None for r in self._refs))
        t = self._data[k].clone()
        self._refs.append(weakref.ref(t))
        return t

    def items(self):
        return ((k, self[k]) for k in self._data)


@pytest.mark.parametrize("scope", ["matrix", "row", "global"])
def test_selection_streams_one_matrix_at_a_time(scope):
    g = torch.Generator().manual_seed(3)
    harm = {f"m{i}.weight": torch.randn(16, 24, generator=g) for i in range(6)}
    benign = {k: torch.rand(16, 24, generator=g) for k in harm}
    ref, _ = select_prune_set(harm, benign, "snip", "snip-abs", 0.05, 0.1, scope)
    th, tb = _Tracked(harm), _Tracked(benign)
    got, _ = select_prune_set(th, tb, "snip", "snip-abs", 0.05, 0.1, scope)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert th.max_alive <= 1 and tb.max_alive <= 1  # at most the previous matrix, never all of them
    # each matrix is read once per selection pass: 1 per set, 3 for global (two histograms + the cut)
    passes = 3 if scope == "global" else 1
    assert len(th._refs) == passes * len(harm) and len(tb._refs) == passes * len(benign)


def test_lazy_score_files_equal_eager(tmp_path):
    from harmprune.attribution.artifact import LazyTensors, load_scores, write_scores
    from harmprune.core.errors import HarmpruneError

    t = {"a.weight": torch.randn(4, 5), "b.weight": torch.randn(3, 2)}
    meta = {"method": "snip", "model_hash": "h", "shapes": {k: list(v.shape) for k, v in t.items()}}
    write_scores(tmp_path, t, meta)
    lazy, eager = load_scores(tmp_path, lazy=True), load_scores(tmp_path)
    assert isinstance(lazy.tensors, LazyTensors) and lazy.sha256 == eager.sha256
    assert list(lazy.tensors) == list(eager.tensors) and "a.weight" in lazy.tensors
    assert all(torch.equal(lazy.tensors[k], eager.tensors[k]) for k in t)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_scores(bad, {**t, "b.weight": torch.tensor([[float("nan"), 0.0]] * 3)}, meta)
    with pytest.raises(HarmpruneError, match="NaN"):
        load_scores(bad)
    lz = load_scores(bad, lazy=True)  # lazy: reported when the matrix is read
    with pytest.raises(HarmpruneError, match="NaN"):
        lz.tensors["b.weight"]


# ---- selection variants (--selection) against plain brute-force references ---------------------

from harmprune.pruning.select import SELECTIONS  # noqa: E402


def brute_topk_outside(score: list[float], k: int, protected: list[bool]) -> list[bool]:
    """Reference: stable descending sort of the unprotected entries' scores, first k (all if fewer)."""
    free = [i for i in range(len(score)) if not protected[i]]
    order = sorted(free, key=lambda i: (-score[i], i))[:k]
    return [i in order for i in range(len(score))]


def brute_z(xs: list[float]) -> list[float]:
    n = len(xs)
    mu = sum(xs) / n
    sd = (sum((x - mu) ** 2 for x in xs) / n) ** 0.5
    return [(x - mu) / sd if sd > 0 else 0.0 for x in xs]


def brute_rank(xs: list[float]) -> list[int]:
    return [sum(1 for y in xs if y < x) for x in xs]


def brute_variant(selection, h, b, q, p, scope):
    """One matrix (2-D lists of floats) under a variant, written out plainly per unit (matrix or row)."""
    units = [sum(h, [])] if scope == "matrix" else [list(r) for r in h]
    bunits = [sum(b, [])] if scope == "matrix" else [list(r) for r in b]
    out = []
    for hu, bu in zip(units, bunits):
        n = len(hu)
        prot_k = count_k(p, n)
        protected = brute_topk_outside(bu, prot_k, [False] * n)
        k = count_k(q, n)
        if selection == "difference":
            top = brute_topk_outside(hu, k, [False] * n)
            out.append([t and not pr for t, pr in zip(top, protected)])
            continue
        if selection == "fill":
            score = hu
        elif selection == "contrastive":
            score = [x - y for x, y in zip(brute_z(hu), brute_z(bu))]
        else:
            score = [float(x - y) for x, y in zip(brute_rank(hu), brute_rank(bu))]
        out.append(brute_topk_outside(score, k, protected))
    flat = sum(out, [])
    return torch.tensor(flat, dtype=torch.bool).reshape(len(h), len(h[0]))


def _rand_matrix(g, rows, cols, kind):
    if kind == "ties":
        return torch.randint(-2, 3, (rows, cols), generator=g).double()
    if kind == "dyadic":  # exact in float32 and float64: both sides compute the same z-scores
        return (torch.randint(-64, 65, (rows, cols), generator=g) / 8.0).double()
    return torch.randn(rows, cols, generator=g).double()


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_selection_variants_equal_brute_force(selection, scope):
    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        rows, cols = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
        kind = ("ties", "dyadic", "randn")[trial % 3]
        h = _rand_matrix(g, rows, cols, kind).float()
        b = _rand_matrix(g, rows, cols, kind).abs().float()
        q = float(torch.rand(1, generator=g)) if trial % 4 else 0.5
        p = (0.0, 0.2, float(torch.rand(1, generator=g)), 0.9)[trial % 4]
        sel = _quiet(harm_specific, {"w": h}, {"w": b}, q, p, scope, selection)
        expect = brute_variant(selection, h.double().tolist(), b.double().tolist(), q, p, scope)
        assert torch.equal(sel.mask["w"], expect), (selection, scope, trial, q, p, h, b)


def test_contrastive_by_hand():
    # harm importance h, benign b (1 x 4); z(h) = [-1.342, -0.447, 0.447, 1.342], z(b) = [1.342, 0.447, -0.447, -1.342]
    # score = z(h) - z(b) = [-2.683, -0.894, 0.894, 2.683]; q = 0.5 -> k = 2: indices 3, 2
    h = {"w": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}
    b = {"w": torch.tensor([[4.0, 3.0, 2.0, 1.0]])}
    assert torch.equal(_quiet(harm_specific, h, b, 0.5, 0.0, "matrix", "contrastive").mask["w"], B([[F, F, T, T]]))
    # a weight important for both (index 3 highest in harm AND benign) loses to one important for harm only
    b2 = {"w": torch.tensor([[0.0, 0.0, 0.0, 9.0]])}
    assert torch.equal(_quiet(harm_specific, h, b2, 0.25, 0.0, "matrix", "contrastive").mask["w"], B([[F, F, T, F]]))


def test_rank_and_fill_by_hand():
    h = {"w": torch.tensor([[5.0, 1e9, 3.0, 2.0, 4.0, 0.0]])}   # 1e9: a "super weight" of harm
    b = {"w": torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0, 4.0]])}
    # q = 0.5 -> k = 3; p = 0.17 -> Top_p(benign) = {1}
    # difference: Top_3(h) = {1, 0, 4} minus {1} = {0, 4}
    assert torch.equal(_quiet(harm_specific, h, b, 0.5, 0.17, "matrix", "difference").mask["w"], B([[T, F, F, F, T, F]]))
    # fill: top 3 of h outside {1}: 5 (0), 4 (4), 3 (2)
    assert torch.equal(_quiet(harm_specific, h, b, 0.5, 0.17, "matrix", "fill").mask["w"], B([[T, F, T, F, T, F]]))
    # rank: rank(h) = [4, 5, 2, 1, 3, 0], rank(b) = [0, 5, 1, 2, 3, 4] -> [4, 0, 1, -1, 0, -4];
    # outside {1}: 4 (0), 1 (2), then 0 at index 4 (index 1 is protected)
    assert torch.equal(_quiet(harm_specific, h, b, 0.5, 0.17, "matrix", "rank").mask["w"], B([[T, F, T, F, T, F]]))


def test_fill_is_a_superset_of_difference_with_exact_counts():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        h, b = torch.randn(7, 9, generator=g), torch.rand(7, 9, generator=g)
        d = _quiet(harm_specific, {"w": h}, {"w": b}, 0.3, 0.3, "matrix", "difference").mask["w"]
        f = _quiet(harm_specific, {"w": h}, {"w": b}, 0.3, 0.3, "matrix", "fill").mask["w"]
        assert bool((d & ~f).sum() == 0) and int(f.sum()) == count_k(0.3, 63)


def test_selection_variants_refuse_global_and_need_benign():
    h = {"w": torch.randn(3, 4)}
    with pytest.raises(ValueError, match="per matrix or per row"):
        _quiet(harm_specific, h, {"w": torch.rand(3, 4)}, 0.5, 0.1, "global", "fill")
    with pytest.raises(ValueError, match="needs benign"):
        _quiet(harm_specific, h, None, 0.5, 0.0, "matrix", "contrastive")
    with pytest.raises(ValueError, match="needs benign scores"):
        _quiet(select_prune_set, h, None, "snip", None, 0.5, 0.0, "matrix", selection="rank")
    with pytest.raises(ValueError, match="unknown selection"):
        _quiet(harm_specific, h, None, 0.5, 0.0, "matrix", "nope")


def test_difference_default_is_unchanged_through_select_prune_set():
    g = torch.Generator().manual_seed(9)
    harm = {f"m{i}.weight": torch.randn(6, 11, generator=g) for i in range(3)}
    benign = {k: torch.rand(6, 11, generator=g) for k in harm}
    for scope in ("matrix", "row", "global"):
        a, sa = select_prune_set(harm, benign, "snip", "snip-abs", 0.2, 0.1, scope)
        b, sb = select_prune_set(harm, benign, "snip", "snip-abs", 0.2, 0.1, scope, selection="difference")
        ref = harm_specific({k: importance(v, "snip") for k, v in harm.items()},
                            {k: importance(v, "snip-abs") for k, v in benign.items()}, 0.2, 0.1, scope).mask
        assert eq(a, b) and eq(a, ref) and sa["selection_variant"] == "difference"


def test_variants_through_select_prune_set_use_importance_direction():
    # signed snip: importance = -S, so the most negative scores are the most harm-important
    S = {"w": torch.tensor([[-5.0, 2.0, -1.0, 0.5]])}
    Bn = {"w": torch.tensor([[0.1, 0.1, 0.1, 0.1]])}
    m, st = _quiet(select_prune_set, S, Bn, "snip", "snip-abs", 0.5, 0.0, "matrix", selection="fill")
    assert torch.equal(m["w"], B([[T, F, T, F]])) and st["selection_variant"] == "fill"
