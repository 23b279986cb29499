"""report.md from results.json alone: tables, and conclusion sentences worded from the numbers.

``summarize`` derives the headline numbers (they are stored in results.json under ``summary``);
``render`` only formats values that are in the results, so every number in the report can be
traced to results.json (a test checks this). Nothing here is hand-written about the outcome.
"""

from __future__ import annotations

import math

RANDOM = "random control"


def fmt(x) -> str:
    """Three significant digits for floats; integers as they are; n/a for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.3g}"  # bool is an int


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _div(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _pct(a, b):
    r = _div(a, b)
    return None if r is None else 100 * r


# ---------------------------------------------------------------- derived numbers


def _overlap_summary(ov: dict) -> dict:
    n = len(ov["names"])
    off = [(i, j) for i in range(n) for j in range(n) if i < j]
    j_obs = _mean(ov["jaccard"][i][j] for i, j in off)
    j_rnd = _mean(ov["jaccard_random"][i][j] for i, j in off)
    o_obs = _mean(ov["overlap"][i][j] for i, j in off)
    o_rnd = _mean(ov["overlap_random"][i][j] for i, j in off)
    ratio = _div(j_obs, j_rnd)
    return {"pairs": len(off), "mean_jaccard": j_obs, "mean_jaccard_random": j_rnd, "jaccard_ratio": ratio,
            "jaccard_pct_vs_random": None if ratio is None else 100 * (ratio - 1),
            "mean_overlap": o_obs, "mean_overlap_random": o_rnd,
            "pairs_above_random": sum(1 for i, j in off if (ov["jaccard"][i][j] or 0) > (ov["jaccard_random"][i][j] or 0))}


def _transfer_summary(tr: dict, anb: dict | None) -> dict:
    rows, cols, eff = tr["rows"], tr["cols"], tr["effect"]
    diag = [eff[i][cols.index(r)] for i, r in enumerate(rows) if r in cols]
    offd = [eff[i][j] for i, r in enumerate(rows) if r != RANDOM for j, c in enumerate(cols) if c != r]
    rnd = eff[rows.index(RANDOM)] if RANDOM in rows else None
    above = None
    if rnd is not None:
        above = sum(1 for i, r in enumerate(rows) if r != RANDOM for j, c in enumerate(cols)
                    if c != r and eff[i][j] > rnd[j])
    out = {"mean_diagonal": _mean(diag), "mean_off_diagonal": _mean(offd), "off_diagonal_entries": len(offd),
           "mean_random": _mean(rnd) if rnd else None, "off_diagonal_above_random": above}
    out["off_over_diagonal_pct"] = _pct(out["mean_off_diagonal"], out["mean_diagonal"])
    if anb:
        k = len(anb["names"])
        out["a_not_b_mean_on_b"] = _mean(anb["on_b"][i][j] for i in range(k) for j in range(k) if i != j)
        out["a_not_b_mean_on_a"] = _mean(anb["on_a"][i][j] for i in range(k) for j in range(k) if i != j)
        out["a_not_b_transfer_kept_pct"] = _pct(out["a_not_b_mean_on_b"], out["mean_off_diagonal"])
        out["a_not_b_own_kept_pct"] = _pct(out["a_not_b_mean_on_a"], out["mean_diagonal"])
    return out


def _curve_summary(curves: dict) -> dict:
    u, r = curves["union"], curves[RANDOM]
    if not u:
        return {}
    last_u, last_r = max(u, key=lambda p: p["q"]), max(r, key=lambda p: p["q"])
    return {"q": last_u["q"], "fraction": last_u["fraction"], "union_harm": last_u["harm_effect"],
            "random_harm": last_r["harm_effect"], "union_benign": last_u["benign_effect"],
            "random_benign": last_r["benign_effect"],
            "harm_ratio_vs_random": _div(last_u["harm_effect"], last_r["harm_effect"])}


def _dist_summary(d: dict) -> dict:
    if not d["total"]:
        return {}
    layer = max(d["by_layer"], key=lambda k: d["by_layer"][k]["pruned"])
    typ = max(d["by_type"], key=lambda k: d["by_type"][k]["pruned"])
    return {"top_layer": layer, "top_layer_pct": 100 * d["by_layer"][layer]["share"], "layers": len(d["by_layer"]),
            "top_type": typ, "top_type_pct": 100 * d["by_type"][typ]["share"]}


def summarize(results: dict) -> dict:
    """Headline numbers per model (and across models when two were measured)."""
    out = {"wall_minutes": results.get("timing_seconds", {}).get("total", 0.0) / 60, "models": {},
           "held_out_total": sum(results["categories"]["held_out_rows"].values())}
    for name, m in results["models"].items():
        out["models"][name] = {"overlap": _overlap_summary(m["overlap"]),
                               "transfer": _transfer_summary(m["transfer"], m.get("a_not_b")),
                               "curves": _curve_summary(m["curves"]),
                               "distribution": _dist_summary(m["distribution"]["union"])}
    names = list(results["models"])
    if len(names) == 2:
        a, b = (results["models"][n]["compression"] for n in names)
        out["compression_ratio"] = {t: _div(b[t], a[t]) for t in a}
    return out


# ---------------------------------------------------------------- rendering


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _more_or_less(pct, more="more", less="fewer") -> str:
    return f"{fmt(abs(pct))}% {more if pct >= 0 else less}"


def _times_or_pct(ratio, pct) -> str:
    if ratio >= 2:
        return f"{fmt(ratio)} times as many weights (by Jaccard) as"
    return f"{_more_or_less(pct)} weights than"


def _overlap_section(m: dict, s: dict) -> list[str]:
    ov = m["overlap"]
    names = ov["names"]
    out = ["### Overlap of the per-category sets", "",
           "Jaccard |A∩B|/|A∪B| observed, with the value two uniformly random sets of the same per-matrix sizes "
           "would have in expectation (E|A∩B| = Σ |A||B|/N per matrix), and their ratio.", ""]
    rows = [[a, b, ov["sizes"][a], ov["sizes"][b], ov["intersection"][i][j],
             ov["expected_intersection"][i][j], ov["jaccard"][i][j], ov["jaccard_random"][i][j],
             ov["jaccard_ratio"][i][j], ov["overlap"][i][j], ov["overlap_random"][i][j]]
            for i, a in enumerate(names) for j, b in enumerate(names) if i < j]
    out.append(_table(["A", "B", "|A|", "|B|", "|A∩B|", "random E|A∩B|", "Jaccard", "random", "ratio",
                       "overlap coef.", "random"], rows))
    o = s["overlap"]
    out += ["", f"**Conclusion.** Over the {o['pairs']} category pairs, the sets share "
                f"{_times_or_pct(o['jaccard_ratio'], o['jaccard_pct_vs_random'])} random sets of the same sizes would "
                f"(mean Jaccard {fmt(o['mean_jaccard'])} vs {fmt(o['mean_jaccard_random'])}; "
                f"mean overlap coefficient {fmt(o['mean_overlap'])} vs {fmt(o['mean_overlap_random'])}); "
                f"{o['pairs_above_random']} of {o['pairs']} pairs overlap more than random."
            if o["jaccard_pct_vs_random"] is not None else "", ""]
    return out


def _transfer_section(m: dict, s: dict) -> list[str]:
    tr, meas = m["transfer"], m["measure"]
    unit = "rise of mean response NLL, nats/token" if meas["name"] == "nll" else f"fall of {meas['name']}"
    out = ["### Transfer: prune A, measure held-out B", "",
           f"Effect ({unit}; positive = less harm). Rows: the prune set; columns: the held-out category. "
           f"The '{RANDOM}' row prunes a random set with the per-matrix counts of {tr['random_control_size_of']}'s set. "
           "The last column is the benign NLL rise (held-out benign completions).", ""]
    rows = [[r, *tr["effect"][i], tr["benign_effect"][i]] for i, r in enumerate(tr["rows"])]
    out.append(_table(["prune \\ measure", *tr["cols"], "benign ΔNLL"], rows))
    t = s["transfer"]
    if t.get("mean_diagonal") is not None:
        out += ["", f"**Conclusion.** Pruning a category's set changes its own held-out harm by "
                    f"{fmt(t['mean_diagonal'])} on average and the other categories' by {fmt(t['mean_off_diagonal'])} "
                    f"({fmt(t['off_over_diagonal_pct'])}% of the own effect); the random control's mean effect is "
                    f"{fmt(t['mean_random'])}, and {t['off_diagonal_above_random']} of {t['off_diagonal_entries']} "
                    "cross-category effects exceed the random control's on the same column."]
    anb = m.get("a_not_b")
    if anb:
        names = anb["names"]
        out += ["", "### A_not_B: prune A minus B", "",
                "Effect on B (left block) and on A (right block) of pruning A's set without B's weights.", ""]
        rows = [[a, *[anb["on_b"][i][j] for j in range(len(names))]] for i, a in enumerate(names)]
        out.append(_table(["A \\ B: effect on B", *names], rows))
        out.append("")
        rows = [[a, *[anb["on_a"][i][j] for j in range(len(names))]] for i, a in enumerate(names)]
        out.append(_table(["A \\ B: effect on A", *names], rows))
        if t.get("a_not_b_transfer_kept_pct") is not None:
            out += ["", f"**Conclusion.** Without the weights shared with B, A's set keeps "
                        f"{fmt(t['a_not_b_transfer_kept_pct'])}% of its mean effect on B "
                        f"({fmt(t['a_not_b_mean_on_b'])} vs {fmt(t['mean_off_diagonal'])}) and "
                        f"{fmt(t['a_not_b_own_kept_pct'])}% of its effect on A "
                        f"({fmt(t['a_not_b_mean_on_a'])} vs {fmt(t['mean_diagonal'])})."]
    return out + [""]


def _curve_section(m: dict, s: dict) -> list[str]:
    out = ["### Compression curves", "",
           "Harm effect (NLL rise on held-out harmful completions: all categories for the union and the random "
           "control, the category's own for a category's set) and benign NLL rise (union and random control "
           "only) versus the fraction of matched "
           "weights pruned.", ""]
    rows = [[name, p["q"], p["pruned"], p["fraction"], p["harm_effect"], p["benign_effect"]]
            for name, pts in m["curves"].items() for p in pts]
    out.append(_table(["set", "q", "pruned", "fraction", "harm effect", "benign ΔNLL"], rows))
    c = s["curves"]
    if c:
        ratio = c["harm_ratio_vs_random"]
        cmp = (f"{fmt(ratio)} times the random control's {fmt(c['random_harm'])}" if ratio is not None
               else f"against the random control's {fmt(c['random_harm'])}")
        out += ["", f"**Conclusion.** At q = {fmt(c['q'])} the union of the category sets "
                    f"({fmt(c['fraction'])} of the weights) raises harmful NLL by {fmt(c['union_harm'])}, {cmp}, "
                    f"while benign NLL changes by {fmt(c['union_benign'])} (random: {fmt(c['random_benign'])})."]
    return out + [""]


def _dist_section(m: dict, s: dict) -> list[str]:
    d = m["distribution"]["union"]
    out = ["### Where the pruned weights sit (union set at the study q)", ""]
    out.append(_table(["layer", "pruned", "share", "density"],
                      [[k, v["pruned"], v["share"], v["density"]] for k, v in d["by_layer"].items()]))
    out.append("")
    out.append(_table(["module type", "pruned", "share", "density"],
                      [[k, v["pruned"], v["share"], v["density"]] for k, v in d["by_type"].items()]))
    ds = s["distribution"]
    if ds:
        out += ["", f"**Conclusion.** Layer {ds['top_layer']} holds the most pruned weights "
                    f"({fmt(ds['top_layer_pct'])}% of the union set, across {ds['layers']} layers) and "
                    f"{ds['top_type']} is the module type with the most ({fmt(ds['top_type_pct'])}%)."]
    return out + [""]


def _compare_section(results: dict) -> list[str]:
    names = list(results["models"])
    comp = {n: results["models"][n]["compression"] for n in names}
    out = ["## Model comparison", "",
           "Fraction of weights the union set needs to reach a harm effect (NLL rise, interpolated in log "
           "fraction on the union curve); smaller = the harm weights are more compressed.", ""]
    targets = list(comp[names[0]])
    ratios = results["summary"].get("compression_ratio", {})
    out.append(_table(["harm effect", *names, f"{names[1]} / {names[0]}"],
                      [[t, *[comp[n][t] for n in names], ratios.get(t)] for t in targets]))
    valid = [t for t in targets if ratios.get(t) is not None]
    if valid:
        t = valid[0]
        r = ratios[t]
        if r == 1:
            verdict = "both need the same fraction"
        else:
            verdict = (f"{names[0]} needs {'fewer' if r > 1 else 'more'} weights: its harm weights are "
                       f"{'more' if r > 1 else 'less'} compressed")
        out += ["", f"**Conclusion.** To raise harmful NLL by {t}, {names[1]} needs {fmt(r)} times the "
                    f"fraction of weights {names[0]} needs; {verdict}."]
    return out + [""]


def render(results: dict) -> str:
    cfg, cats, s = results["config"], results["categories"], results["summary"]
    out = ["# Ablation across harm categories", "",
           f"Model {', '.join(results['models'])}; data {cfg['data']} by category, held-out "
           f"{s['held_out_total']} harmful and {cats['eval_benign_rows']} "
           f"benign records; harm score {cfg['method']}, benign protection {cfg['benign_method']}; "
           f"sets Top_q \\ Top_p with q = {fmt(cfg['q'])}, p = {fmt(cfg['p'])}, scope {cfg['scope']}. "
           f"Wall time {fmt(s['wall_minutes'])} min.", ""]
    out.append(_table(["category", "scored rows", "held-out rows"],
                      [[g, cats["scoring_rows"][g], cats["held_out_rows"].get(g)] for g in cats["scoring_rows"]]))
    out += [""] + [f"- note: {n}" for n in cats["notes"]] + [""]
    for name, m in results["models"].items():
        ms = s["models"][name]
        out += [f"## {name}", "",
                f"Set sizes at q = {fmt(cfg['q'])}: " + ", ".join(f"{g} {m['sets'][g]['total_pruned']}" for g in m["sets"])
                + f"; union {m['union_size']} of {m['numel']} matched weights.", ""]
        out += _overlap_section(m, ms) + _transfer_section(m, ms) + _curve_section(m, ms) + _dist_section(m, ms)
    if len(results["models"]) == 2:
        out += _compare_section(results)
    figs = results.get("figures", [])
    if figs:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figs] + [""]
    t = results.get("timing_seconds", {})
    out += ["## Timing", "", _table(["phase", "seconds"], [[k, v] for k, v in t.items()]), ""]
    return "\n".join(out)
