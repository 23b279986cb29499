"""Figures like the paper's (matplotlib, Agg): energy kept / utility / harm against rho for top-K and
both controls, MSO against eta with the random baseline. Each function returns the file name."""

from __future__ import annotations

from pathlib import Path

from ...core.plots import pyplot, save

BASIS_STYLE = {"topk": ("top-K", "C0", "o"), "randk": ("random-K", "C1", "s"), "gaussian": ("Gaussian", "C2", "^")}


def _xy(points: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = [p for p in points if p.get(y) is not None]
    return [p[x] for p in pts], [p[y] for p in pts]


def energy_figure(curve: dict, path: Path, title: str) -> str:
    """``curve[basis][mode] = [{rho, fraction}]`` → energy kept against rho, one panel per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, mode in zip(axes, ("parallel", "orth")):
        for b, modes in curve.items():
            label, color, marker = BASIS_STYLE.get(b, (b, None, "o"))
            ax.plot(*_xy(modes[mode], "rho", "fraction"), marker=marker, color=color, label=label)
        ax.set_xlabel("rho (fraction of min(m, n) kept)")
        ax.set_title(f"{mode} projection", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("energy of the update kept")
    axes[0].legend(fontsize=8)
    save(fig, path, title)
    return Path(path).name


def _mso_axes(ax, curves: dict[str, list[dict]], title: str) -> None:
    rand = None
    for i, (label, pts) in enumerate(curves.items()):
        ax.plot(*_xy(pts, "eta", "mso"), marker="o", ms=3, color=f"C{i % 10}", label=label)
        rand = rand or pts
    for i, (label, pts) in enumerate(curves.items()):
        ax.plot(*_xy(pts, "eta", "random"), ls="--", lw=1, color=f"C{i % 10}", alpha=0.6)
    ax.plot([], [], ls="--", color="grey", label="random baseline (dashed)")
    ax.set_xlabel("eta (energy fraction)")
    ax.set_ylabel("MSO")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def mso_figure(curves: dict[str, list[dict]], path: Path, title: str) -> str:
    """One panel: MSO against eta per curve, each with its random baseline dashed in its colour."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _mso_axes(ax, curves, title)
    save(fig, path)
    return Path(path).name


def weight_mso_figure(res: dict, path: Path) -> str:
    """One panel per update pair: MSO against eta per module type, random baselines dashed."""
    plt = pyplot()
    pairs = list(res["by_type"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        _mso_axes(ax, res["by_type"][pair], f"weight updates: {pair}")
    save(fig, path)
    return Path(path).name


def projection_figure(rows: dict, levels: dict, metrics: dict, path: Path, title: str) -> str:
    """Rows of panels, one per metric, columns per mode: ``rows[mode][basis] = [{rho, <metric>}]``
    against rho; ``levels[metric] = {label: value}`` are horizontal reference lines (aligned, fine-tuned)."""
    plt = pyplot()
    modes = list(rows)
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(4.4 * len(modes), 2.8 * len(metrics)),
                             sharex=True, squeeze=False)
    for i, (metric, ylabel) in enumerate(metrics.items()):
        for ax, mode in zip(axes[i], modes):
            for b, pts in rows[mode].items():
                label, color, marker = BASIS_STYLE.get(b, (b, None, "o"))
                ax.plot(*_xy(pts, "rho", metric), marker=marker, color=color, label=label)
            for j, (label, v) in enumerate(levels.get(metric, {}).items()):
                if v is not None:
                    ax.axhline(v, ls=[":", "--", "-."][j % 3], color="k", lw=1, alpha=0.7, label=label)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{mode} projection", fontsize=9)
            if i == len(metrics) - 1:
                ax.set_xlabel("rho")
        axes[i][0].set_ylabel(ylabel, fontsize=8)
    axes[0][0].legend(fontsize=7)
    save(fig, path, title, dpi=110)
    return Path(path).name


def location_figure(loc: dict, path: Path, title: str) -> str:
    """Share of ‖V‖² and of ‖L Lᵀ V‖² per rho carried by the B-TAP set vs random sets of the same size."""
    plt = pyplot()
    labels = ["V"] + [f"rank-k V (rho={r})" for r in loc["rank_k"]]
    sets = [("B-TAP set", "btap", "C3"), ("random, same counts", "random", "C7"),
            ("largest |V|, same counts", "largest_v", "C0")]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) + 2), 3.8))
    width = 0.8 / len(sets)
    for j, (name, key, color) in enumerate(sets):
        vals = [loc["V"][key]] + [loc["rank_k"][r][key] for r in loc["rank_k"]]
        ax.bar([i + (j - 1) * width for i in range(len(labels))], [v or 0 for v in vals], width, label=name,
               color=color)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=15)
    ax.set_ylabel("share of squared mass")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path)
    return Path(path).name
