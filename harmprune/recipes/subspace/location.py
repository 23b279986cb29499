"""Where B-TAP's harm-specific set sits relative to the alignment subspace (neither paper has it).

For the set S (per matrix ``Top_q(I_harm) \\ Top_p(I_benign)`` on the aligned model) and V = W_aligned
- W_base: the share of ‖V‖² carried by S, and of ‖L Lᵀ V‖² (V's rank-k part, top-k basis) for each
rho, against (a) random coordinates of the same count per matrix and (b) the coordinates of largest
|V| of the same count (the most the count could carry). The reverse experiment prunes (b) and (a)
next to S and measures the same harm and utility.
"""

from __future__ import annotations

import warnings

from tqdm.auto import tqdm

from ...pruning.harmset import harm_set, scores_of
from ...pruning.masks import count, count_of, intersection
from ...pruning.select import PruneWarning, mask_stats, random_control
from ...subspace.location import largest_magnitude, mass, share
from ...subspace.projection import parallel_part
from ...core.tensors import TensorReader


def btap_set(handle, opts, cache_dir, harmful: str, benign: str, q: float, p: float,
             selection: str = "difference") -> tuple[dict, dict]:
    """B-TAP's harm-specific mask on the loaded model (snip on harmful, snip-abs on benign, scored with
    ``opts`` through the score cache in ``cache_dir``: ``pruning.harmset``) and its record."""
    info = {}
    scores = {}
    for label, data, method in (("harm", harmful, "snip"), ("benign", benign, "snip-abs")):
        s = scores[label] = scores_of(handle, data, method, opts, cache_dir)
        fingerprint = {k: v for k, v in s.meta["data"].items() if k not in ("selection", "seed", "record_ids")}
        info[label] = {"data": fingerprint, "method": method, "records": s.meta["nsamples"]["selected"],
                       "tokens": s.meta["tokens"]["response"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneWarning)
        mask, st = harm_set(scores["harm"], scores["benign"], q, p, "matrix", selection)
    info.update(q=q, p=p, scope="matrix", selection=selection, total_pruned=st["total_pruned"], total_numel=st["total_numel"],
                warnings=st["warnings"])
    return mask, info


def locate(mask: dict, base: TensorReader, aligned: TensorReader, cache, rhos: list[float], seed: int,
           device="cpu") -> tuple[dict, dict, dict]:
    """``(location record, random-control mask, largest-|V| mask)``; masks have the set's per-matrix counts."""
    rand = random_control(mask, seed)
    largest, parts = {}, {"V": {"btap": [], "random": [], "largest_v": []}}
    parts.update({r: {"btap": [], "random": [], "largest_v": []} for r in rhos})
    count = numel = 0
    for name, m in tqdm(mask.items(), desc="B-TAP set vs alignment update", leave=False):
        v = aligned.get(name, device) - base.get(name, device)
        c = count_of(m)
        count, numel = count + c, numel + m.numel()
        largest[name] = largest_magnitude(v, c).cpu()
        f = cache.get(name)
        views = {"V": v, **{r: parallel_part(v, f.basis(r, "topk"), f.transposed) for r in rhos}}
        for key, x in views.items():
            for label, mm in (("btap", m), ("random", rand[name]), ("largest_v", largest[name])):
                parts[key][label].append(mass(x, mm))
    doc = {"V": {k: share(v) for k, v in parts["V"].items()},
           "rank_k": {str(r): {k: share(v) for k, v in parts[r].items()} for r in rhos},
           "pruned": count, "numel": numel, "expected_random": count / numel if numel else None}
    return doc, rand, largest


def set_overlap(a: dict, b: dict) -> dict:
    """How many coordinates two masks share (B-TAP set vs largest-|V| set)."""
    inter = intersection(a, {k: b[k].to(a[k].device) for k in a if k in b})
    size = count(a)
    return {"shared": inter, "size": size, "fraction": inter / size if size else None}


def stats_of(mask: dict) -> dict:
    st = mask_stats(mask)
    return {k: st[k] for k in st if k in ("total_pruned", "per_module_type")}


