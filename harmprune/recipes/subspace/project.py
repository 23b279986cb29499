"""``harmprune subspace project``: keep the part of a fine-tune's update that lies in (or outside)
the alignment subspace, and write the result as a loadable checkpoint.

``W = W_aligned + L Lᵀ U`` (``--mode parallel``) or ``W_aligned + (U - L Lᵀ U)`` (``--mode orth``)
for every selected tensor, with ``V = W_aligned - W_base``, ``U = W_finetuned - W_aligned`` and L the
``--basis`` of V at ``--rho`` (``harmprune.subspace.projection``). Unselected tensors keep their
aligned values (results.json records how much of the update they held). Memory: one loaded copy of
the aligned model, modified in place, plus the tensors of one matrix at a time read from the three
checkpoints' safetensors files; each matrix is factorised once for all ``--rho`` values (factors are
kept in memory, or in ``--factor-dir`` as safetensors files when given).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...core import manifest
from ...core.errors import HarmpruneError
from ...core.models import checkpoint_hash, load_model, parse_dtype
from ...core.settings import check, opt, to_dict
from ...core.targets import module_type
from ...core import validate
from ...core.models import resolve_device
from ...core.options import (PAPER_RHOS, OutputOptions, PairOptions, RuntimeOptions, SeedOptions,  # noqa: F401
                             SubspaceOptions, TargetOptions)
from ...subspace.projection import BASES, MODES, SIDES, Factors, factorize, parallel_part, project, total_energy
from ...core.tensors import TensorReader, check_same_layout
from .checkpoints import checkpoint_info, select_tensors



@dataclass(kw_only=True)
class ProjectConfig(PairOptions, SubspaceOptions, TargetOptions, RuntimeOptions, SeedOptions, OutputOptions):
    """Settings of ``harmprune subspace project``: ``--out`` is one checkpoint (one rho) or a directory of
    rho-<R>/ checkpoints; ``--targets`` are tensors or their modules (none = the decoder-block linear
    weights; 1-D tensors use scalar projection); ``--seed`` seeds random-k and the Gaussian control;
    SVDs run in float32 on ``--device`` whatever ``--dtype``."""

    finetuned: str = opt(help="fine-tune of the aligned model whose update is projected", role="input")
    mode: str = opt("parallel", help="keep the update's part inside (parallel) or outside (orth) the subspace",
                    choices=list(MODES))
    basis: str = opt("topk", help="top-k singular vectors of V, k random ones (randk), or a Gaussian control",
                     choices=list(BASES))
    energy_rho: list[float] = opt(PAPER_RHOS, help="rho grid of the energy-kept figure (every basis)", range="(0, 1]")
    factor_dir: str | None = opt(None, help="keep the per-matrix SVD factors in this directory instead of memory", role="output")

    def __post_init__(self):
        self.device = resolve_device(self.device)  # SVDs and tensors go straight to it
        validate.check_device(self.device)
        check(bool(self.out), "--out is required")
        check(bool(self.rho) and all(0 < r <= 1 for r in self.rho), "--rho values must be in (0, 1]")
        check(all(0 < r <= 1 for r in self.energy_rho), "--energy-rho values must be in (0, 1]")
        check(len(set(self.rho)) == len(self.rho), "--rho values must be distinct")
        parse_dtype(self.dtype)


class FactorCache:
    """Each tensor's :class:`Factors`, computed on first use from the aligned and base readers.

    ``spill``: a directory where factors are written as safetensors (one file per tensor) instead of
    being kept in memory (for models whose factors do not fit).
    """

    def __init__(self, base: TensorReader, aligned: TensorReader, seed: int, side: str, device,
                 spill: str | Path | None = None):
        self.base, self.aligned, self.seed, self.side, self.device = base, aligned, seed, side, device
        self.spill = Path(spill) if spill else None
        self._mem: dict[str, Factors] = {}
        self.seconds = 0.0

    def _file(self, name: str) -> Path:
        return self.spill / f"{name}.safetensors"

    def get(self, name: str) -> Factors:
        if name in self._mem:
            return self._mem[name]
        if self.spill and self._file(name).is_file():
            return _read_factors(self._file(name), self.device)
        t = time.perf_counter()
        f = factorize(self.aligned.get(name, self.device) - self.base.get(name, self.device), self.seed, name,
                      self.side)
        self.seconds += time.perf_counter() - t
        if self.spill:
            self.spill.mkdir(parents=True, exist_ok=True)
            _write_factors(self._file(name), f)
        else:
            self._mem[name] = f
        return f


def _write_factors(path: Path, f: Factors) -> None:
    from safetensors.torch import save_file

    tensors = {"sigma": f.sigma, "gauss": f.gauss, "perm": f.perm}
    if f.left is not None:
        tensors["left"] = f.left
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"transposed": str(int(f.transposed)), "shape": ",".join(map(str, f.shape))})


def _read_factors(path: Path, device) -> Factors:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        meta = st.metadata()
        t = {k: st.get_tensor(k) for k in st.keys()}
    left = t["left"].to(device) if "left" in t else None
    shape = tuple(int(x) for x in meta["shape"].split(",") if x)
    return Factors(left, t["sigma"].to(device), t["gauss"].to(device), t["perm"], meta["transposed"] == "1", shape)


def check_parameters(model, names: list[str], shapes: dict) -> dict[str, torch.nn.Parameter]:
    """The model's parameters for ``names``; one line when a checkpoint tensor is not one of them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for n in names:
        if n not in params:
            raise HarmpruneError(f"checkpoint tensor {n} is not a parameter of the loaded model "
                                 f"(e.g. {next(iter(params))}); is the checkpoint saved by transformers?")
        if tuple(params[n].shape) != tuple(shapes[n]):
            raise HarmpruneError(f"{n}: the loaded model's parameter has shape {list(params[n].shape)}, "
                                 f"the checkpoint {list(shapes[n])}")
    return {n: params[n] for n in names}


@torch.no_grad()
def apply_projection(params: dict, aligned: TensorReader, finetuned: TensorReader, cache: FactorCache, rho: float,
                     basis: str, mode: str, curve: dict | None = None, desc: str = "project") -> dict[str, dict]:
    """Set every parameter in ``params`` to ``W_aligned + kept part of U`` in place; return the
    per-tensor energy records. ``curve``: when given, also fill ``curve[basis][rho] = [kept, update]``
    (parallel energy summed over tensors) for the rhos already in it (the energy-kept figure)."""
    records = {}
    for name, p in tqdm(params.items(), desc=desc, leave=False):
        wa = aligned.get(name, p.device)
        u = finetuned.get(name, p.device) - wa
        f = cache.get(name)
        kept, records[name] = project(u, f, rho, basis, mode)
        records[name].update(shape=list(p.shape), type=module_type(name, bias_apart=True))
        p.data.copy_((wa + kept).to(p.dtype))
        if curve is not None:
            for b, points in curve.items():
                for r, acc in points.items():
                    par = parallel_part(u, f.basis(r, b), f.transposed)
                    acc[0] += float(par.double().pow(2).sum())
                    acc[1] += float(u.double().pow(2).sum())
    return records


@torch.no_grad()
def restore_aligned(params: dict, aligned: TensorReader) -> None:
    """Put the aligned values back into ``params`` (read again from the aligned checkpoint)."""
    for name, p in params.items():
        p.data.copy_(aligned.get(name, p.device).to(p.dtype))


def unselected_update(aligned: TensorReader, finetuned: TensorReader, selected: list[str]) -> dict:
    """‖U‖² of the tensors left out of the projection (the fine-tune's change they drop)."""
    chosen = set(selected)
    total, count, numel = 0.0, 0, 0
    for name in aligned.names():
        if name in chosen:
            continue
        d = finetuned.get(name) - aligned.get(name)
        total += float(d.double().pow(2).sum())
        count += int(torch.count_nonzero(d))
        numel += d.numel()
    return {"update": total, "changed_entries": count, "entries": numel}


def energy_curve_doc(curve: dict) -> dict:
    """``{basis: {"parallel": [{rho, fraction}], "orth": [...]}}`` from summed parallel energies."""
    out = {}
    for b, points in curve.items():
        par = [{"rho": r, "fraction": (a / t if t > 0 else None)} for r, (a, t) in sorted(points.items())]
        orth = [{"rho": p["rho"], "fraction": None if p["fraction"] is None else 1 - p["fraction"]} for p in par]
        out[b] = {"parallel": par, "orth": orth}
    return out


def rho_dir(rho: float) -> str:
    return f"rho-{rho:g}"


def run_project(cfg: ProjectConfig) -> Path:
    """Write the projected checkpoint(s), results.json and energy_kept.png; return ``cfg.out``."""
    from ...pruning.checkpoint import original_tokenizer
    from . import plots

    t0 = time.perf_counter()
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    manifest.banner("subspace project", to_dict(cfg))
    with TensorReader(cfg.base, "base") as base, TensorReader(cfg.aligned, "aligned") as aligned, \
            TensorReader(cfg.finetuned, "finetuned") as finetuned:
        check_same_layout([base, aligned, finetuned])
        names = select_tensors(aligned.shapes, cfg.targets, cfg.ignore)
        model, _ = load_model(cfg.aligned, cfg.dtype, cfg.device)
        tok = original_tokenizer(cfg.aligned)
        params = check_parameters(model, names, aligned.shapes)
        cache = FactorCache(base, aligned, cfg.seed, cfg.side, cfg.device, cfg.factor_dir)
        curve = {b: {r: [0.0, 0.0] for r in cfg.energy_rho} for b in BASES}
        results = {"config": to_dict(cfg), "versions": manifest.versions(),
                   "inputs": {r.label: {**checkpoint_info(r), "checkpoint_hash": checkpoint_hash(r.spec)}
                              for r in (base, aligned, finetuned)},
                   "tensors": len(names), "unselected": unselected_update(aligned, finetuned, names), "rho": {}}
        with manifest.atomic_dir(cfg.out, cfg.overwrite) as tmp:
            for i, rho in enumerate(cfg.rho):
                recs = apply_projection(params, aligned, finetuned, cache, rho, cfg.basis, cfg.mode,
                                        curve if i == 0 else None, desc=f"project rho={rho:g}")
                target = tmp if len(cfg.rho) == 1 else tmp / rho_dir(rho)
                model.save_pretrained(target)
                tok.save_pretrained(target)
                results["rho"][f"{rho:g}"] = {"checkpoint": "." if len(cfg.rho) == 1 else rho_dir(rho),
                                              "total": total_energy(recs), "per_tensor": recs}
                print(f"harmprune: rho {rho:g} {cfg.basis} {cfg.mode}: energy kept "
                      f"{_pct(total_energy(recs)['fraction'])} of the update over {len(recs)} tensors")
            results["energy_curve"] = energy_curve_doc(curve)
            results["svd_seconds"] = cache.seconds
            results["wall_seconds"] = time.perf_counter() - t0
            results["figures"] = [plots.energy_figure(results["energy_curve"], tmp / "energy_kept.png",
                                                      f"energy of the update kept ({Path(cfg.finetuned).name})")]
            manifest.write_json(tmp / "results.json", results)
            manifest.write_config(tmp, "subspace project", cfg)
    print(f"harmprune: projected checkpoint written to {cfg.out}")
    return Path(cfg.out)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
