"""``harmprune subspace overlap``: do harmful and useful fine-tuning updates, and the alignment
update, occupy the same weight subspaces?

Per selected tensor, MSO (``harmprune.subspace.overlap``) over the ``--etas`` grid of three pairs:
``(F_harmful - A, F_useful - A)``, ``(F_harmful - A, B - A)`` and ``(F_useful - A, B - A)``, then
means per module type and per layer. Tensors are read one at a time from the four checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ...core import manifest
from ...core.settings import check, opt, to_dict
from ...core.targets import layer_index, module_type
from ...subspace.overlap import left_factors, mso_curve
from ...subspace.projection import as_matrix
from ...core.tensors import TensorReader, check_same_layout
from .checkpoints import checkpoint_info, select_tensors

from ...core import validate
from ...core.models import resolve_device
from ...core.options import OutputOptions, PairOptions, RuntimeOptions, SubspaceOptions, TargetOptions  # noqa: E402,F401
PAIRS = {"harmful vs useful": ("harmful", "useful"), "harmful vs alignment": ("harmful", "alignment"),
         "useful vs alignment": ("useful", "alignment")}


@dataclass(kw_only=True)
class OverlapConfig(PairOptions, SubspaceOptions, TargetOptions, RuntimeOptions, OutputOptions):
    """Settings of ``harmprune subspace overlap`` (``--targets``: tensors or their modules; SVDs on ``--device``)."""

    harmful: str = opt(help="A fine-tuned on harmful data (F_harmful)", role="input")
    useful: str = opt(help="A fine-tuned on useful data (F_useful)", role="input")

    def __post_init__(self):
        self.device = resolve_device(self.device)  # SVDs and tensors go straight to it
        validate.check_device(self.device)
        check(bool(self.out), "--out is required")
        check(bool(self.eta) and all(0 < e <= 1 for e in self.eta), "--eta values must be in (0, 1]")


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def group_curves(per_tensor: dict[str, dict], key) -> dict[str, dict[str, list[dict]]]:
    """``{pair: {group: [{eta, mso, random, tensors}]}}``: means over the tensors of each group."""
    out: dict = {}
    for pair in PAIRS:
        groups: dict = {}
        for name, curves in per_tensor.items():
            groups.setdefault(str(key(name)), []).append(curves[pair])
        out[pair] = {g: [{"eta": pts[0][i]["eta"], "mso": _mean([p[i]["mso"] for p in pts]),
                          "random": _mean([p[i]["random"] for p in pts]),
                          "tensors": sum(p[i]["mso"] is not None for p in pts)} for i in range(len(pts[0]))]
                     for g, pts in groups.items()}
    return out


def weight_overlap(base: TensorReader, aligned: TensorReader, harmful: TensorReader, useful: TensorReader,
                   names: list[str], etas: list[float], device: str = "cpu") -> dict:
    """Per-tensor MSO curves of the three pairs, their means by module type, by layer and overall."""
    per_tensor = {}
    for name in tqdm(names, desc="weight MSO", leave=False):
        a = aligned.get(name, device)
        upd = {"harmful": harmful.get(name, device) - a, "useful": useful.get(name, device) - a,
               "alignment": base.get(name, device) - a}
        upd = {k: left_factors(as_matrix(v)) for k, v in upd.items()}  # one SVD per update, shared by 2 pairs
        per_tensor[name] = {pair: mso_curve(upd[x], upd[y], etas) for pair, (x, y) in PAIRS.items()}
    return {"etas": etas, "per_tensor": per_tensor, "by_type": group_curves(per_tensor, lambda n: module_type(n, bias_apart=True)),
            "by_layer": group_curves(per_tensor, layer_index), "overall": group_curves(per_tensor, lambda n: "all")}


def run_overlap(cfg: OverlapConfig) -> Path:
    """Write results.json and mso_weights.png; return ``cfg.out``."""
    from . import plots

    t0 = time.perf_counter()
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    manifest.banner("subspace overlap", to_dict(cfg))
    with TensorReader(cfg.base, "base") as b, TensorReader(cfg.aligned, "aligned") as a, \
            TensorReader(cfg.harmful, "harmful") as h, TensorReader(cfg.useful, "useful") as u:
        check_same_layout([b, a, h, u])
        names = select_tensors(a.shapes, cfg.targets, cfg.ignore)
        res = weight_overlap(b, a, h, u, names, cfg.eta, cfg.device)
        inputs = {r.label: checkpoint_info(r) for r in (b, a, h, u)}
    results = {"config": to_dict(cfg), "versions": manifest.versions(), "inputs": inputs, "tensors": len(names),
               "pairs": {p: list(v) for p, v in PAIRS.items()}, **res}
    with manifest.atomic_dir(cfg.out, cfg.overwrite) as tmp:
        results["figures"] = [plots.weight_mso_figure(res, tmp / "mso_weights.png")]
        results["wall_seconds"] = time.perf_counter() - t0
        manifest.write_json(tmp / "results.json", results)
        manifest.write_config(tmp, "subspace overlap", cfg)
    for pair in PAIRS:
        pts = res["overall"][pair]["all"]
        mid = pts[len(pts) // 2]
        print(f"harmprune: {pair}: MSO {_fmt(mid['mso'])} at eta {mid['eta']:g} (random {_fmt(mid['random'])})")
    return Path(cfg.out)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
