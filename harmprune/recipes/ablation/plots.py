"""Figures (matplotlib, Agg): annotated heatmaps, compression curves (log x), distribution bars."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from ...core.plots import pyplot, save

RANDOM = "random control"


def _label(text: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def heatmap(ax, matrix, rows, cols, title: str, cmap: str = "viridis", center: float | None = None,
            log: bool = False) -> None:
    """Annotated heatmap on ``ax``; None cells are blank; a diverging map is centred on ``center``;
    ``log``: logarithmic colours (for ratios spanning decades; needs positive values)."""
    import numpy as np
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    data = np.array([[_num(v) for v in r] for r in matrix], dtype=float)
    finite = data[np.isfinite(data)]
    norm = None
    if log and finite.size and finite.min() > 0:
        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
    elif center is not None and finite.size and finite.min() < center < finite.max():
        norm = TwoSlopeNorm(vcenter=center, vmin=finite.min(), vmax=finite.max())
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(cols)), [_label(c) for c in cols], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [_label(r, 22) for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    size = max(5, 9 - max(len(rows), len(cols)) // 3)
    lo, hi = (finite.min(), finite.max()) if finite.size else (0, 1)
    if isinstance(norm, LogNorm):
        lo, hi = math.log(lo), math.log(hi)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if math.isfinite(v):
                x = math.log(v) if isinstance(norm, LogNorm) else v
                light = (x - lo) / (hi - lo) < 0.5 if hi > lo else True
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=size,
                        color="white" if light and cmap == "viridis" else "black")


def overlap_figure(m: dict, path: Path, title: str) -> None:
    plt = pyplot()
    ov = m["overlap"]
    n = len(ov["names"])
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.1 * n, 3 + 0.5 * n))
    # the diagonal (a set with itself) is trivially 1 and would swamp the colour scale
    def off_diagonal(mat):
        return [[None if i == j else v for j, v in enumerate(row)] for i, row in enumerate(mat)]

    heatmap(axes[0], off_diagonal(ov["jaccard"]), ov["names"], ov["names"],
            "Jaccard of per-category harm sets (diagonal = 1, left blank)")
    ratio = off_diagonal(ov["jaccard_ratio"])
    positive = all(v is None or v > 0 for row in ratio for v in row)
    heatmap(axes[1], ratio, ov["names"], ov["names"], "Jaccard / random sets of the same sizes"
            + (" (log colours)" if positive else ""), cmap="viridis" if positive else "RdBu_r",
            center=None if positive else 1.0, log=positive)
    save(fig, path, title)


def transfer_figure(m: dict, path: Path, title: str) -> None:
    plt = pyplot()
    tr, anb = m["transfer"], m.get("a_not_b")
    panels = 2 if anb else 1
    n = len(tr["cols"])
    fig, axes = plt.subplots(1, panels, figsize=(panels * (3.5 + 0.8 * n), 3 + 0.5 * n), squeeze=False)
    unit = "NLL rise" if m["measure"]["name"] == "nll" else f"fall of {m['measure']['name']}"
    heatmap(axes[0][0], tr["effect"], tr["rows"], tr["cols"], f"prune row set → effect on column ({unit})",
            cmap="RdBu_r", center=0.0)
    axes[0][0].set_xlabel("held-out category measured", fontsize=8)
    if anb:
        heatmap(axes[0][1], anb["on_b"], anb["names"], anb["names"], "prune A minus B → effect on B",
                cmap="RdBu_r", center=0.0)
    save(fig, path, title)


def _curve_axes(axes, curves: dict, label_prefix: str = "", thin_categories: bool = True, style: str = "-") -> None:
    for name, pts in curves.items():
        pts = sorted((p for p in pts if p["fraction"] > 0), key=lambda p: p["fraction"])
        if not pts:
            continue
        main = name in ("union", RANDOM)
        if not main and not thin_categories:
            continue
        kw = dict(lw=2.2 if main else 0.9, alpha=1.0 if main else 0.6, marker="o" if main else ".",
                  ls="--" if name == RANDOM else style, label=_label(label_prefix + name, 30))
        for ax, key in zip(axes, ("harm_effect", "benign_effect")):
            if all(p[key] is None for p in pts):
                continue  # per-category curves measure harm only (see run.study)
            ax.plot([p["fraction"] for p in pts], [_num(p[key]) for p in pts], **kw)
    for ax, what in zip(axes, ("harmful (held-out) NLL rise", "benign (held-out) NLL rise")):
        ax.set_xscale("log")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("fraction of matched weights pruned (log)")
        ax.set_ylabel(f"{what}, nats/token")


def curves_figure(models: dict, path: Path, title: str) -> None:
    plt = pyplot()
    k = len(models)
    fig, axes = plt.subplots(k, 2, figsize=(12, 4.2 * k), squeeze=False)
    for row, (name, m) in zip(axes, models.items()):
        _curve_axes(row, m["curves"])
        row[0].set_title(f"{name}: harm", fontsize=9)
        row[1].set_title(f"{name}: benign", fontsize=9)
        row[1].legend(fontsize=6, loc="best")
    save(fig, path, title)


def compression_figure(models: dict, path: Path, title: str) -> None:
    """Union and random curves of every model on shared axes, and the fraction needed per harm target."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for (name, m), style in zip(models.items(), ("-", ":")):
        pts = sorted((p for p in m["curves"]["union"] if p["fraction"] > 0), key=lambda p: p["fraction"])
        axes[0].plot([p["fraction"] for p in pts], [_num(p["harm_effect"]) for p in pts], style + "o", label=f"{name} union")
        rnd = sorted((p for p in m["curves"][RANDOM] if p["fraction"] > 0), key=lambda p: p["fraction"])
        axes[0].plot([p["fraction"] for p in rnd], [_num(p["harm_effect"]) for p in rnd], style + "x", alpha=0.6,
                     label=f"{name} random")
        targets = list(m["compression"])
        axes[1].plot([float(t) for t in targets], [_num(m["compression"][t]) for t in targets], style + "o", label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fraction of matched weights pruned (log)")
    axes[0].set_ylabel("harmful NLL rise, nats/token")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("harm effect reached (NLL rise, nats/token)")
    axes[1].set_ylabel("fraction of weights needed (log)")
    axes[1].set_title("fewer weights needed = more compressed", fontsize=9)
    axes[1].legend(fontsize=7)
    save(fig, path, title)


def distribution_figure(m: dict, path: Path, title: str) -> None:
    plt = pyplot()
    d = m["distribution"]["union"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    layers = list(d["by_layer"])
    axes[0].bar(range(len(layers)), [d["by_layer"][k]["share"] for k in layers], color="tab:blue")
    axes[0].set_xticks(range(len(layers)), layers, fontsize=7)
    axes[0].set_xlabel("layer (from the parameter name)")
    axes[0].set_ylabel("share of pruned weights")
    types = list(d["by_type"])
    axes[1].bar(range(len(types)), [d["by_type"][k]["share"] for k in types], color="tab:orange")
    axes[1].set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("share of pruned weights")
    save(fig, path, title)


def all_figures(results: dict, out: Path) -> list[str]:
    """Write every figure into ``out``; return the file names (relative)."""
    files = []
    models = results["models"]
    for name, m in models.items():
        for stem, fn, what in (("overlap", overlap_figure, "overlap of harm-specific sets"),
                               ("transfer", transfer_figure, "transfer across categories"),
                               ("distribution", distribution_figure, "layer and module type of pruned weights")):
            f = f"{stem}-{name}.png"
            fn(m, out / f, f"{name}: {what}")
            files.append(f)
    curves_figure(models, out / "curves.png", "compression curves: union, random control, each category")
    files.append("curves.png")
    if len(models) > 1:
        compression_figure(models, out / "compression.png", "compression: " + " vs ".join(models))
        files.append("compression.png")
    return files
