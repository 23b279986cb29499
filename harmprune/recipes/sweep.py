"""``make sweep``: the before/after NLL table over a (q, p) grid, with same-size controls.

For every p and q: the harm-specific set, a random control and a magnitude control with the same
per-matrix counts, each applied in place on one loaded model and restored. Writes ``sweep.csv``,
``sweep.png``, ``sweep.md`` (table), ``sweep.json`` and picks the recommended point: the most harm-specific one whose
benign NLL rises by at most ``max_benign_rel`` (relative).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.models import load_model, model_name
from ..core.options import PruneInputs, QGridOptions
from ..core.plots import pyplot, save
from ..core.settings import check, opt, to_dict
from ..evals.nll import nll_row, with_deltas
from ..evals.results import held_out
from ..pruning.apply import masked
from ..pruning.harmset import score_pair
from ..pruning.select import SelectionError, check_second_band, select_prune_set

PS = [0.0, 1e-3, 1e-2]
VARIANTS = ("harm-specific", "random", "magnitude", "second-band")


@dataclass(kw_only=True)
class SweepConfig(PruneInputs, QGridOptions):
    """Settings of ``harmprune sweep`` (``make sweep``); ``--out`` defaults to results/sweep-<model>.
    ``make sweep`` passes ``--eval-nsamples 32``: the 46-point grid then takes about 30 min on 2 CPU cores."""

    ps: list[float] = opt(PS, help="p values", range="[0, 1]")
    controls: list[str] = opt(["random", "magnitude"], help="controls to measure beside the harm-specific set "
                              "(random, magnitude, second-band)", choices=list(VARIANTS[1:]))
    max_benign_rel: float = opt(0.05, help="largest relative benign NLL rise allowed for the recommended point", range=">= 0")
    min_d_harmful: float = opt(0.01, help="smallest harmful NLL rise (nats/token) a recommended point must exceed", range="finite")

    def __post_init__(self):
        super().__post_init__()
        validate.check_grid(self.qs, "--qs")
        validate.check_grid(self.ps, "--ps")
        validate.check_finite(self.max_benign_rel, "--max-benign-rel")
        validate.check_finite(self.min_d_harmful, "--min-d-harmful")
        bad = sorted(set(self.controls) - set(VARIANTS[1:]))
        check(not bad, f"--controls: unknown control {bad[0] if bad else ''!r}; choose from {', '.join(VARIANTS[1:])}")
        if "second-band" in self.controls:  # every grid point, before the first is measured
            for q in self.qs:
                for p in self.ps:
                    check_second_band(q, p, "--qs", "--ps")


def recommend(rows: list[dict], max_benign_rel: float, min_d_harmful: float = 0.0) -> dict | None:
    """The harm-specific point with the highest specificity among those whose benign NLL rises by at
    most ``max_benign_rel`` (relative) and whose harmful NLL rises by more than ``min_d_harmful``
    (nats/token; a ratio of two tiny rises is noise, e.g. 3 pruned weights giving +0.0007 / +0.0002)."""
    ok = [r for r in rows if r["variant"] == "harm-specific" and r["d_harmful"] > min_d_harmful
          and r["benign_rel"] <= max_benign_rel and r["pruned"] > 0]
    return max(ok, key=lambda r: (r["specificity"] if not math.isnan(r["specificity"]) else -1, r["d_harmful"]),
               default=None)


def markdown_table(rows: list[dict], best: dict | None) -> str:
    """One line per (p, q): the harm-specific set's NLL rises and specificity beside both controls'."""
    by = {(r["p"], r["q"], r["variant"]): r for r in rows}
    controls = [v for v in VARIANTS[1:] if any(k[2] == v for k in by)]
    head = ["p", "q", "pruned", "fraction", "Δharmful", "Δbenign", "benign rise", "Δh/Δb"]
    head += [f"{c} Δh / Δb" for c in controls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (p, q, variant), r in by.items():
        if variant != "harm-specific":
            continue
        mark = " **(recommended)**" if best and (best["p"], best["q"]) == (p, q) else ""
        cells = [f"{p:g}", f"{q:g}{mark}", str(r["pruned"]), f"{r['fraction']:.2e}", f"{r['d_harmful']:+.4f}",
                 f"{r['d_benign']:+.4f}", f"{r['benign_rel']:+.1%}", f"{r['specificity']:.2f}"]
        cells += [f"{by[(p, q, c)]['d_harmful']:+.4f} / {by[(p, q, c)]['d_benign']:+.4f}" for c in controls
                  if (p, q, c) in by]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], base: dict, path: Path, title: str) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2), sharex=True)
    styles = {"harm-specific": "-o", "random": "--s", "magnitude": ":^", "second-band": "-.d"}
    for ax, key, label in ((axes[0], "d_harmful", "harmful"), (axes[1], "d_benign", "benign")):
        for variant in VARIANTS:
            for p in sorted({r["p"] for r in rows}):
                pts = sorted((r["fraction"], r[key]) for r in rows if r["variant"] == variant and r["p"] == p
                             and r["fraction"] > 0)
                if pts:
                    ax.plot(*zip(*pts), styles[variant], label=f"{variant}, p={p:g}", alpha=0.85, markersize=4)
        ax.set_xscale("log")
        # symlog: the useful regime (rises of 0.001-0.1 nat) and destructive points (10+ nats) on one axis
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("fraction of matched weights pruned")
        ax.set_ylabel(f"{label} NLL increase (nats/token, symlog)")
        ax.set_title(f"{label} completions (base {base[key.replace('d_', '') + '_nll']:.3f})")
    axes[1].legend(fontsize=7, ncol=1)
    save(fig, path, title)


def run_sweep(cfg: SweepConfig) -> Path:
    """Measure the grid and write sweep.csv, sweep.png, sweep.md and sweep.json into the output directory."""
    from tqdm.auto import tqdm

    out = Path(cfg.out or Path("results") / f"sweep-{model_name(cfg.model)}")
    manifest.check_out_dir(out, cfg.overwrite)
    for w in {w for q in cfg.qs for p in cfg.ps for w in validate.fraction_warnings(q, p, "--qs", "--ps")}:
        validate.warn(w)
    manifest.banner("sweep", {**to_dict(cfg), "out": str(out)})
    handle = load_model(cfg.model, cfg.dtype, cfg.device)
    model, tok = handle
    harm, benign = score_pair(handle, cfg)
    harm_rows, benign_rows = held_out(cfg.eval_harm, cfg.eval_nsamples, cfg.seed), held_out(cfg.eval_benign, cfg.eval_nsamples, cfg.seed)
    base = nll_row(model, tok, harm_rows, benign_rows, cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {n: params[n] for n in harm.tensors}
    rows = []
    grid = [(p, q, v) for p in cfg.ps for q in cfg.qs for v in ("harm-specific", *cfg.controls)]
    for p, q, variant in tqdm(grid, desc="sweep (p, q, variant)"):
        control = "none" if variant == "harm-specific" else variant
        try:
            mask, stats = select_prune_set(harm.tensors, benign.tensors if p > 0 else None, harm.method,
                                           benign.method, q, p, cfg.scope, control, cfg.seed, weights)
        except SelectionError as e:  # one point that cannot be drawn must not lose the finished ones
            validate.warn(f"sweep point p={p:g} q={q:g} {variant} left out: {e}")
            continue
        with masked(model, mask):
            r = with_deltas(nll_row(model, tok, harm_rows, benign_rows, cfg), base)
        rows.append({"p": p, "q": q, "variant": variant, "pruned": stats["total_pruned"],
                     "fraction": stats["total_fraction"], **r})
    best = recommend(rows, cfg.max_benign_rel, cfg.min_d_harmful)
    with manifest.atomic_dir(out, cfg.overwrite) as tmp:
        with open(tmp / "sweep.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, base, tmp / "sweep.png", f"{model_name(cfg.model)}: {cfg.method} harm vs {cfg.benign_method} "
             f"benign, scope {cfg.scope}, held-out {len(harm_rows)}+{len(benign_rows)}")
        (tmp / "sweep.md").write_text(markdown_table(rows, best))
        manifest.write_config(tmp, "sweep", cfg, out=str(out))
        manifest.write_json(tmp / "sweep.json", {"config": to_dict(cfg), "model_hash": handle.hash, "base": base,
                                                 "rows": rows, "recommended": best, "versions": manifest.versions()})
    print(f"harmprune: sweep written to {out}")
    if best:
        print(f"recommended: q={best['q']:g} p={best['p']:g}: Δharmful {best['d_harmful']:+.4f}, "
              f"Δbenign {best['d_benign']:+.4f} ({best['benign_rel']:+.1%}), specificity {best['specificity']:.2f}")
    else:
        print(f"no harm-specific point raised harmful NLL by more than {cfg.min_d_harmful:g} with benign NLL "
              f"rising <= {cfg.max_benign_rel:.0%}")
    return out
