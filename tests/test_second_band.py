"""B-TAP's second-band control against a plain, loop-written reference."""

import warnings

import pytest
import torch

from harmprune.pruning.select import (CONTROLS, PruneWarning, control_mask, harm_specific, importance,
                                      second_band_control, select_prune_set)


def reference_second_band(pruned: torch.Tensor, protected: torch.Tensor | None, imp: torch.Tensor) -> torch.Tensor:
    """Walk the weights from the highest importance down (lowest flat index first among equals) and
    take every one that is neither pruned nor protected until there are as many as pruned."""
    flat_imp = imp.reshape(-1).tolist()
    taken = pruned.reshape(-1).tolist()
    prot = protected.reshape(-1).tolist() if protected is not None else [False] * len(flat_imp)
    want = sum(taken)
    order = sorted(range(len(flat_imp)), key=lambda i: (-flat_imp[i], i))
    out = [False] * len(flat_imp)
    got = 0
    for i in order:
        if got == want:
            break
        if not taken[i] and not prot[i]:
            out[i] = True
            got += 1
    return torch.tensor(out).reshape(pruned.shape)


def _scores(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 16), "b.weight": (16, 8), "c.weight": (4, 40), "d.weight": (12, 12)}
    harm = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    benign = {n: torch.randn(s, generator=g).abs() for n, s in shapes.items()}
    # a few exact ties, so the tie rule is exercised
    harm["a.weight"].view(-1)[:6] = -1.5
    return harm, benign


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_second_band_equals_reference_same_counts_no_overlap(seed, scope):
    harm, benign = _scores(seed)
    imp = {n: importance(t, "snip") for n, t in harm.items()}
    bimp = {n: importance(t, "snip-abs") for n, t in benign.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneWarning)
        sel = harm_specific(imp, bimp, q=0.25, p=0.25, scope=scope)
    band = second_band_control(sel.mask, imp, sel.benign_top)
    assert set(band) == set(sel.mask)
    for n, m in sel.mask.items():
        assert int(band[n].sum()) == int(m.sum()) > 0, n  # same per-matrix count
        assert not (band[n] & m).any(), n  # never overlaps the pruned set
        assert not (band[n] & sel.benign_top[n]).any(), n  # keeps the benign protection
        assert torch.equal(band[n], reference_second_band(m, sel.benign_top[n], imp[n])), n


def test_second_band_is_the_next_band_by_hand():
    # importance (signed snip: -S) of one 1x8 matrix: 7 6 5 4 3 2 1 0 at indices 0..7
    s = {"w": -torch.arange(7.0, -1.0, -1.0).reshape(1, 8)}
    imp = {"w": importance(s["w"], "snip")}
    pruned = {"w": torch.tensor([[True, False, True, False, False, False, False, False]])}
    protected = {"w": torch.tensor([[False, True, False, False, False, False, False, False]])}
    band = second_band_control(pruned, imp, protected)
    # next best outside {0, 2} and the protected {1}: indices 3 and 4
    assert band["w"].tolist() == [[False, False, False, True, True, False, False, False]]
    # without benign protection index 1 is next
    assert second_band_control(pruned, imp)["w"].tolist() == [[False, True, False, True, False, False, False, False]]


def test_second_band_through_select_prune_set():
    harm, benign = _scores(5)
    assert "second-band" in CONTROLS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneWarning)
        mask, stats = select_prune_set(harm, benign, "snip", "snip-abs", q=0.1, p=0.2)
        band, bstats = select_prune_set(harm, benign, "snip", "snip-abs", q=0.1, p=0.2, control="second-band")
    for n in mask:
        assert bstats["per_matrix"][n]["pruned"] == stats["per_matrix"][n]["pruned"]
        assert not (band[n] & mask[n]).any()
    assert bstats["harm_specific_total"] == stats["total_pruned"] == bstats["total_pruned"]


def test_second_band_needs_importances_and_room():
    m = {"w": torch.ones(1, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="harm importances"):
        control_mask("second-band", m)
    with pytest.raises(ValueError, match="only 0"):
        second_band_control(m, {"w": torch.zeros(1, 4)})
