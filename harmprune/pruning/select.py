"""Which weights to prune: pure tensor functions over ``{parameter name: tensor}`` dicts, no I/O.

Direction: selection always takes the *largest importance* first. Importance is ``-S`` for
signed ``snip`` (its most negative scores are the weights whose removal most raises the loss)
and ``S`` for ``snip-abs`` and ``wanda``.

Counts: ``k = floor(frac * n)`` with ``frac`` read as the decimal the user wrote (so 0.29 of 100
is 29, not 28), where ``n`` is the matrix size (``matrix``), the row length (``row``, per output
row) or the number of all matched weights (``global``).

Ties: among equal importances the lowest flat index wins (row-major index within a matrix). For
``global`` the weights are ordered by the dict's key order, then flat index, so an earlier key
wins a tie. ``-0.0`` and ``0.0`` are equal. Scores must be finite (callers check on load).

Selection variants (``--selection``; every one takes at most ``k = floor(q * n)`` weights per unit and
never a weight of ``Top_p(benign)``):

- ``difference`` (default, B-TAP): ``Top_q(I_harm) \\ Top_p(I_benign)``; fewer than k where the two top
  sets overlap.
- ``fill``: the difference set topped up to exactly k: the k largest ``I_harm`` outside ``Top_p(I_benign)``
  (a superset of ``difference``).
- ``contrastive``: the k largest ``z(I_harm) - z(I_benign)`` outside ``Top_p(I_benign)``, where
  ``z(x) = (x - mean(x)) / std(x)`` over the unit (population std, float64; a constant unit has z = 0).
  Harm importance *against* benign importance, per weight: a weight important for both scores low.
- ``rank``: the k largest ``rank(I_harm) - rank(I_benign)`` outside ``Top_p(I_benign)``, where ``rank(x)_i``
  = the number of entries of the unit strictly smaller than ``x_i`` (ties share the lowest rank). Scale-free:
  a few huge scores ("super weights") move it no more than any other weight.

The variants other than ``difference`` work per matrix or per row (``global`` is refused), and fewer than
k weights are taken only where fewer than k lie outside the protected set. Ties: lowest flat index.

``global`` never sorts all weights: an exact radix select on the order-preserving integer image
of the float32 importances finds the k-th largest value in two histogram passes, and one more
pass resolves ties at that value by the rule above. Memory stays O(largest matrix).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..attribution.formulas import importance  # the one sign convention
from ..core.errors import HarmpruneError
from ..core.options import SELECTIONS  # the one list of variants (the --selection choices)
from ..core.targets import module_type
from .masks import Masks, count_of

SCOPES = ("matrix", "row", "global")
CONTROLS = ("none", "random", "magnitude", "second-band")
BENIGN_SCORED = ("contrastive", "rank")  # selections that read the benign importance itself, not only Top_p
SELECTION_RULES = {  # what each variant selects, as prune_config.json records it
    "difference": "Top_q(I_harm) \\ Top_p(I_benign)",
    "fill": "the k = floor(q n) largest I_harm outside Top_p(I_benign)",
    "contrastive": "the k = floor(q n) largest z(I_harm) - z(I_benign) outside Top_p(I_benign)",
    "rank": "the k = floor(q n) largest rank(I_harm) - rank(I_benign) outside Top_p(I_benign)",
}



class LazyMap(Mapping):
    """``{key: fn(key)}`` computed on access: importances of one matrix at a time, never all at once.

    ``numel(key)`` gives a value's size without computing it (global selection needs the total).
    """

    def __init__(self, keys, fn, numel):
        self._keys, self._fn, self.numel = list(keys), fn, numel
        self._set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._fn(key)

    def __contains__(self, key) -> bool:  # without computing the value
        return key in self._set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _numel(scores, name: str) -> int:
    """Size of one entry of a score mapping, without reading it where the mapping knows shapes."""
    if isinstance(scores, LazyMap):
        return scores.numel(name)
    shapes = getattr(scores, "shapes", None)  # attribution.artifact.LazyTensors
    return math.prod(shapes[name]) if shapes is not None else scores[name].numel()


SUPER_WEIGHT_WARNING = (
    "p = 0: no benign protection; signed SNIP's top entries include the model's 'super weights', "
    "whose removal can break the model (measured: benign NLL x25 on SmolLM2-135M at q = 1e-5)"
)


def count_k(frac: float, n: int) -> int:
    """``floor(frac * n)`` with ``frac`` taken as its shortest decimal repr (exact arithmetic)."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {frac}")
    return math.floor(Fraction(repr(float(frac))) * n)


def _topk_rows(x: torch.Tensor, k: int, keep_dtype: bool = False) -> torch.Tensor:
    """Bool mask of the k largest entries of each row of a 2-D tensor (lowest column wins ties).

    Importances are compared in float32; ``keep_dtype`` compares ``x`` as it is (the float64 variant scores)."""
    rows, n = x.shape
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    x = x if keep_dtype else x.float()
    return _fill_ties(x, _kth_largest(x, k), k)


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row k-th largest value, shape (rows, 1). topk is much faster than kthvalue for small k."""
    n = x.shape[1]
    if k <= n // 64:
        return torch.topk(x, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    if n - k + 1 <= n // 64:
        return torch.topk(x, n - k + 1, dim=1, largest=False, sorted=False).values.max(dim=1, keepdim=True).values
    return torch.kthvalue(x, n - k + 1, dim=1, keepdim=True).values


def _fill_ties(x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """Entries above the per-row threshold ``t``, plus the lowest-index entries equal to it up to k per row.

    IEEE comparison makes -0.0 and 0.0 tie, as documented.
    """
    above = x > t
    need = k - torch.count_nonzero(above, dim=1).unsqueeze(1)
    tied = x == t
    if x.shape[0] == 1:  # one row: index the few tied entries instead of a cumulative sum
        idx = tied.view(-1).nonzero().squeeze(1)[: int(need)]
        above.view(-1)[idx] = True
        return above
    return above | (tied & (tied.cumsum(1, dtype=torch.int32) <= need))


def _ordered_key(x: torch.Tensor) -> torch.Tensor:
    """Map float32 to int32 with the same order: sign times magnitude bits (so -0.0 and 0.0 both map to 0)."""
    i = x.float().contiguous().view(torch.int32)
    m = i & 0x7FFFFFFF
    return torch.where(i < 0, -m, m)


def _key_value(key: int) -> float:
    """Inverse of ``_ordered_key`` for one key."""
    bits = key if key >= 0 else (-key) | -0x80000000
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _hist16(v: torch.Tensor) -> torch.Tensor:
    return torch.bincount(v.reshape(-1), minlength=1 << 16).cpu()


def _pick_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= k, and count(bins > b)."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= k).nonzero().max())
    return b, int(at_or_above[b] - hist[b])


def _global_topk(imp: Masks, frac: float) -> Masks:
    total = sum(_numel(imp, n) for n in imp)
    k = count_k(frac, total)
    if k <= 0 or k >= total:
        return {n: torch.full_like(t, k > 0, dtype=torch.bool) for n, t in imp.items()}
    # Radix select of the k-th largest key. Pass 1: histogram of the high 16 bits (offset to be
    # non-negative); pass 2: histogram of the low 16 bits inside the chosen high bin.
    hist = sum(_hist16((_ordered_key(t) >> 16) + (1 << 15)) for t in imp.values())
    hi, above = _pick_bin(hist, k)
    hi_signed = hi - (1 << 15)
    hist2 = torch.zeros(1 << 16, dtype=torch.int64)
    for t in imp.values():
        key = _ordered_key(t)
        hist2 += _hist16(key[(key >> 16) == hi_signed] & 0xFFFF)
    lo, above2 = _pick_bin(hist2, k - above)
    thresh = torch.tensor([[_key_value(hi_signed * (1 << 16) + lo)]])
    remaining = k - above - above2  # entries equal to the threshold still to take, in key order
    out = {}
    for name, t in imp.items():
        x = t.float().reshape(1, -1)
        m = x > thresh.to(x.device)
        if remaining > 0:
            idx = (x == thresh.to(x.device)).view(-1).nonzero().squeeze(1)[:remaining]
            m.view(-1)[idx] = True
            remaining -= idx.numel()
        out[name] = m.reshape(t.shape)
    return out


def topk_mask(imp: Masks, frac: float, scope: str) -> Masks:
    """Bool masks of the top ``frac`` of each matrix / each row / all weights (see module doc)."""
    if scope == "global":
        return _global_topk(imp, frac)
    if scope == "matrix":
        return {n: _topk_rows(t.reshape(1, -1), count_k(frac, t.numel())).reshape(t.shape) for n, t in imp.items()}
    if scope == "row":
        out = {}
        for n, t in imp.items():
            t2 = t.reshape(t.shape[0], -1)
            out[n] = _topk_rows(t2, count_k(frac, t2.shape[1])).reshape(t.shape)
        return out
    raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")


def empty_keys(masks: Masks) -> list[str]:
    """Matrices where nothing is selected (k = 0 for matrix/row scope); reported, never hidden."""
    return [n for n, m in masks.items() if count_of(m) == 0]


@dataclass
class Selection:
    """The harm-specific set and the two top sets it came from, with warnings to report."""

    mask: Masks
    harm_top: Masks
    benign_top: Masks | None
    warnings: list[str] = field(default_factory=list)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor: ``(x - mean) / std`` in float64 (population std; 0 where std = 0)."""
    x = x.double()
    mu = x.mean(dim=1, keepdim=True)
    sd = x.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(sd > 0, (x - mu) / torch.where(sd > 0, sd, 1.0), torch.zeros_like(x))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor: how many entries of the row are strictly smaller (int64; ties share it)."""
    x = x.float() + 0.0  # -0.0 == 0.0, as everywhere in selection
    srt = torch.sort(x, dim=1).values
    return torch.searchsorted(srt, x.contiguous(), right=False)


def variant_score(selection: str, harm: torch.Tensor, benign: torch.Tensor | None) -> torch.Tensor:
    """The per-weight score a variant ranks, per row of 2-D ``harm``/``benign`` importances (float64)."""
    if selection == "fill":
        return harm.double()
    if benign is None:
        raise ValueError(f"--selection {selection} needs benign importances")
    if selection == "contrastive":
        return _zscore(harm) - _zscore(benign)
    if selection == "rank":
        return (_ranks(harm) - _ranks(benign)).double()
    raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")


def top_outside(score: torch.Tensor, k: int, taken: torch.Tensor | None) -> torch.Tensor:
    """Per row of 2-D ``score``: the k largest entries outside ``taken`` (all free ones when fewer than k
    are free); lowest column wins ties. Compared in ``score``'s own dtype."""
    if taken is not None:
        score = score.masked_fill(taken, float("-inf"))
    m = _topk_rows(score, k, keep_dtype=True)
    return m & ~taken if taken is not None else m


def variant_mask(selection: str, harm: torch.Tensor, benign: torch.Tensor | None, q: float, scope: str,
                 protected: torch.Tensor | None) -> torch.Tensor:
    """One matrix's mask under a variant (not ``difference``): see the module doc. ``protected`` is the
    matrix's ``Top_p(benign)`` mask (None: nothing protected)."""
    if scope not in ("matrix", "row"):
        raise ValueError(f"--selection {selection} works per matrix or per row, not with --scope {scope}")
    shape = harm.shape
    rows = (lambda t: t.reshape(1, -1)) if scope == "matrix" else (lambda t: t.reshape(shape[0], -1))
    h = rows(harm)
    b = rows(benign.to(harm.device)) if benign is not None else None
    taken = rows(protected.to(harm.device)) if protected is not None else None
    return top_outside(variant_score(selection, h, b), count_k(q, h.shape[1]), taken).reshape(shape)


def harm_specific(harm_imp: Masks, benign_imp: Masks | None, q: float, p: float, scope: str,
                  selection: str = "difference") -> Selection:
    """``Top_q(harm) & ~Top_p(benign)`` per key (``selection`` picks a variant, see the module doc);
    ``p = 0`` (or no benign scores) protects nothing."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    if selection != "difference" and scope not in ("matrix", "row"):
        raise ValueError(f"--selection {selection} works per matrix or per row, not with --scope {scope}")
    if selection in BENIGN_SCORED and benign_imp is None:
        raise ValueError(f"--selection {selection} needs benign importances")
    harm_top = topk_mask(harm_imp, q, scope)
    warnings = []
    if (p > 0 or selection in BENIGN_SCORED) and benign_imp is not None:
        missing = [n for n in harm_imp if n not in benign_imp]
        if missing:
            raise ValueError(f"benign importances lack {len(missing)} keys, e.g. {missing[0]}")
    if p > 0:
        if benign_imp is None:
            raise ValueError("p > 0 needs benign importances")
        benign_top = topk_mask(LazyMap(harm_imp, benign_imp.__getitem__, lambda n: _numel(harm_imp, n)), p, scope)
        unprotected = empty_keys(benign_top)
        if unprotected:
            warnings.append(f"p = {p} ({scope}) gives k = 0 in {len(unprotected)} of {len(benign_top)} "
                            f"matrices, which get no benign protection, e.g. {unprotected[0]}")
    else:
        benign_top = None
        warnings.append(SUPER_WEIGHT_WARNING)
    if selection == "difference":
        mask = {n: harm_top[n] & ~benign_top[n] for n in harm_top} if benign_top is not None else dict(harm_top)
    else:
        mask = {n: variant_mask(selection, harm_imp[n], benign_imp[n] if selection in BENIGN_SCORED else None, q,
                                scope, benign_top[n] if benign_top is not None else None) for n in harm_top}
    empty = empty_keys(harm_top)
    if empty:
        warnings.append(f"q = {q} ({scope}) gives k = 0 in {len(empty)} of {len(harm_top)} matrices, "
                        f"e.g. {empty[0]}")
    return Selection(mask, harm_top, benign_top, warnings)


def _key_seed(seed: int, name: str) -> int:
    # Per-matrix streams keyed by name: a matrix's control does not depend on the other keys present.
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _sample_indices(n: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """c distinct indices uniform in [0, n): rejection sampling for sparse c, a permutation otherwise."""
    if c == 0:
        return torch.empty(0, dtype=torch.long)
    if 4 * c > n:
        return torch.randperm(n, generator=gen)[:c]
    drawn = torch.empty(0, dtype=torch.long)
    while True:
        drawn = torch.cat([drawn, torch.randint(n, (2 * c + 16,), generator=gen)])
        uniq, inv = torch.unique(drawn, return_inverse=True)
        if uniq.numel() >= c:
            break
    # first c distinct values in draw order: a uniform c-subset (sequential sampling without replacement)
    first = torch.full((uniq.numel(),), drawn.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(drawn.numel()), reduce="amin")
    return uniq[first.argsort()[:c]]


def random_control(mask: Masks, seed: int) -> Masks:
    """Same count per matrix as ``mask``, positions uniform among the matrix's weights (seeded)."""
    out = {}
    for name, m in mask.items():
        gen = torch.Generator().manual_seed(_key_seed(seed, name))
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[_sample_indices(m.numel(), count_of(m), gen)] = True
        out[name] = r.reshape(m.shape).to(m.device)
    return out


class SelectionError(HarmpruneError, ValueError):
    """A control that cannot be drawn at these settings: one line for the user (a ValueError for callers)."""


def check_second_band(q: float, p: float, flag_q: str = "--q", flag_p: str = "--p") -> None:
    """Refuse, before any work, a (q, p) where the second band can never fit: it needs as many free weights
    as the harm set holds (at least (q - p) n of n), outside the harm set and the protected p n."""
    if 2 * q - p > 1:
        raise HarmpruneError(f"--control second-band at {flag_q} {q:g}, {flag_p} {p:g}: the second band needs as many "
                             f"weights as the harm set, which leaves too few free weights (needs 2q - p <= 1); "
                             f"lower {flag_q}")


def _top_free(imp: torch.Tensor, c: int, taken: torch.Tensor | None, name: str, what: str) -> torch.Tensor:
    """Bool mask of the ``c`` largest ``imp`` outside ``taken`` (None = nothing taken); lowest index wins ties."""
    if taken is not None:
        free = imp.numel() - count_of(taken)
        if c > free:
            raise SelectionError(f"{name}: {what} needs {c} weights but only {free} are free (lower --q)")
        imp = imp.masked_fill(taken.to(imp.device), float("-inf"))
    return _topk_rows(imp.reshape(1, -1), c).reshape(imp.shape)


def _protected(benign_mask: Masks | None, name: str) -> torch.Tensor | None:
    return benign_mask.get(name) if benign_mask is not None else None


def magnitude_control(mask: Masks, weights: Masks, benign_mask: Masks | None = None) -> Masks:
    """Same count per matrix as ``mask``: the smallest ``|W|`` outside ``benign_mask`` (lowest index wins ties)."""
    return {name: _top_free(-weights[name].detach().float().abs().to(m.device), count_of(m),
                            _protected(benign_mask, name), name, "the magnitude control")
            for name, m in mask.items()}


def second_band_control(mask: Masks, harm_imp: Masks, benign_mask: Masks | None = None) -> Masks:
    """B-TAP's second-band control: the next top band of the harm importance, the first one frozen.

    Per matrix, with ``k`` = the count of ``mask`` in that matrix: the ``k`` weights of highest
    harm importance (larger = more important, see ``importance``) that are neither in ``mask`` nor
    in ``benign_mask`` (the benign-protected Top_p); lowest flat index wins ties. Same size and
    same benign protection as the harm-specific set, but never overlapping it: if pruning it does
    what pruning ``mask`` does, the effect comes from redundancy among high-importance weights,
    not from these particular weights.

    (B-TAP's code, ``--freeze_first_top_q``, prunes ``Top_2q \\ Top_q \\ Top_p``, whose size can
    differ from the harm-specific set's; here the count is matched exactly.)
    """
    out = {}
    for name, m in mask.items():
        protected = _protected(benign_mask, name)
        taken = m | protected.to(m.device) if protected is not None else m  # the pruned and protected sets
        out[name] = _top_free(harm_imp[name].float().to(m.device).reshape(m.shape), count_of(m), taken, name,
                              "the second band")
    return out


def control_mask(control: str, mask: Masks, seed: int = 0, weights: Masks | None = None,
                 benign_mask: Masks | None = None, harm_imp: Masks | None = None) -> Masks:
    """Dispatch ``none | random | magnitude | second-band`` (the last needs the harm importances)."""
    if control == "none":
        return mask
    if control == "random":
        return random_control(mask, seed)
    if control == "magnitude":
        if weights is None:
            raise ValueError("the magnitude control needs the model's weights")
        return magnitude_control(mask, weights, benign_mask)
    if control == "second-band":
        if harm_imp is None:
            raise ValueError("the second-band control needs the harm importances")
        return second_band_control(mask, harm_imp, benign_mask)
    raise ValueError(f"unknown control {control!r}; expected one of {CONTROLS}")


def mask_stats(mask: Masks) -> dict:
    """Per-matrix, per-module-type and total counts and fractions (JSON-ready)."""
    per, by_type = {}, {}
    total = numel = 0
    for name, m in mask.items():
        c, n = count_of(m), m.numel()
        per[name] = {"pruned": c, "numel": n, "fraction": c / n if n else 0.0}
        t = module_type(name)
        by_type[t] = by_type.get(t, 0) + c
        total, numel = total + c, numel + n
    return {"total_pruned": total, "total_numel": numel, "total_fraction": total / numel if numel else 0.0,
            "per_module_type": by_type, "per_matrix": per}


def select_prune_set(harm_scores: Masks, benign_scores: Masks | None, method_harm: str,
                     method_benign: str | None, q: float, p: float, scope: str = "matrix",
                     control: str = "none", seed: int = 0, weights: Masks | None = None,
                     selection: str = "difference") -> tuple[Masks, dict]:
    """The Python API for sweeps: raw scores in, ``(mask, stats)`` out, no files.

    ``mask`` is the harm-specific set ``Top_q(I_harm) & ~Top_p(I_benign)`` (or the ``selection``
    variant's set, see the module doc) or, with ``control``, a control with the same per-matrix counts.
    ``stats`` holds the counts of every set (``harm_specific`` = the selection's), the selection
    (``selection_variant``), the matrices with nothing selected and the warnings; each warning is also
    issued with ``warnings.warn`` so interactive users see it.
    """
    import warnings as _w

    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    # lazy: each matrix's importance is computed when selection reaches it, so peak memory is the
    # masks plus one matrix, not two float copies of every score (scores may be LazyTensors too)
    harm_imp = LazyMap(harm_scores, lambda n: importance(harm_scores[n], method_harm),
                       lambda n: _numel(harm_scores, n))
    benign_imp = None
    if p > 0 or selection in BENIGN_SCORED:
        if benign_scores is None or method_benign is None:
            raise ValueError(f"{'p > 0' if p > 0 else '--selection ' + selection} needs benign scores and their method")
        benign_imp = LazyMap([n for n in harm_scores if n in benign_scores],
                             lambda n: importance(benign_scores[n], method_benign), lambda n: _numel(benign_scores, n))
    sel = harm_specific(harm_imp, benign_imp, q, p, scope, selection)
    mask = control_mask(control, sel.mask, seed, weights, sel.benign_top, harm_imp)
    stats = mask_stats(mask)
    specific = mask_stats(sel.mask)
    for name, row in stats["per_matrix"].items():
        row["harm_top"] = count_of(sel.harm_top[name])
        row["benign_top"] = count_of(sel.benign_top[name]) if sel.benign_top is not None else 0
        row["harm_specific"] = specific["per_matrix"][name]["pruned"]
    stats["harm_specific_total"] = specific["total_pruned"]
    stats["selection_variant"] = selection
    stats["k_zero"] = {"harm": empty_keys(sel.harm_top),
                       "benign": empty_keys(sel.benign_top) if sel.benign_top is not None else []}
    stats["empty_after_difference"] = empty_keys(sel.mask)
    stats["warnings"] = list(sel.warnings)
    for msg in sel.warnings:
        _w.warn(msg, PruneWarning, stacklevel=2)
    return mask, stats


class PruneWarning(UserWarning):
    """A selection that is legal but probably not what the user wants (p = 0, k = 0 matrices)."""
