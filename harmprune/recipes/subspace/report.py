"""report.md of the subspace study: every number comes from results.json; the reading is computed
from them by fixed rules (stated in the text), never written by hand."""

from __future__ import annotations

from ...evals import results as R
from .evaluate import METRICS

PAPER = ("Ponkshe et al. (ICLR 2026), on five open-source LLMs (among them Llama-3.2-1B and Qwen-2.5-1.5B), "
         "report that subspaces which amplify safe behaviours also amplify unsafe ones, and that prompts with "
         "different safety implications activate overlapping representations: they find no subspace that "
         "selectively governs safety. (Their numbers are in the paper; none are reproduced here.)")


def _f(x, d: int = 3) -> str:
    return R.fmt(x, d)


def _share(proj, aligned, ft):
    """The fraction of the fine-tune's move of a metric that a projection reproduces."""
    if None in (proj, aligned, ft) or abs(ft - aligned) < 1e-12:
        return None
    return (proj - aligned) / (ft - aligned)


def _levels(res: dict) -> list[str]:
    keys = list(METRICS)
    rows = [[name] + [_f(v.get(k)) for k in keys] for name, v in res["levels"].items()]
    return ["## Reference levels", "", R.md_table(["model"] + [METRICS[k][0] for k in keys], rows), "",
            "Directions: " + "; ".join(f"{METRICS[k][0]}: {METRICS[k][1]}" for k in keys) + ".", ""]


def _projection_tables(res: dict) -> list[str]:
    lines = ["## Projections", "",
             "Energy = ‖kept‖² / ‖U‖² over the projected tensors. *Share* = (metric of the projection − aligned) / "
             "(fine-tune − aligned): the part of the fine-tune's effect on that metric the projection reproduces.", ""]
    lv = res["levels"]
    for kind, modes in res["projections"].items():
        rows = []
        for mode, bases in modes.items():
            for basis, pts in bases.items():
                for p in pts:
                    rows.append([mode, basis, f"{p['rho']:g}", _f(p["energy"]), _f(p.get("harm_classifier")),
                                 _f(p.get("harmful_nll")),
                                 _f(_share(p.get("harmful_nll"), lv["aligned"].get("harmful_nll"), lv[kind].get("harmful_nll"))),
                                 _f(p.get("benign_nll")),
                                 _f(_share(p.get("benign_nll"), lv["aligned"].get("benign_nll"), lv[kind].get("benign_nll"))),
                                 _f(p.get("xstest_compliance"))])
        lines += [f"### {kind} fine-tune", "",
                  R.md_table(["mode", "basis", "rho", "energy", "harm (classifier)", "harmful NLL", "share",
                              "benign NLL", "share", "XSTest compliance"], rows), ""]
    return lines


def _selectivity(res: dict) -> list[str]:
    """Rule: for each fine-tune and rho, compare top-K parallel with the controls on the ratio
    harmful-NLL share / benign-NLL share (1 = harm and utility move together)."""
    lv = res["levels"]
    out = []
    for kind, modes in res["projections"].items():
        par = modes.get("parallel", {})
        if "topk" not in par:
            continue
        for i, p in enumerate(par["topk"]):
            hs = _share(p.get("harmful_nll"), lv["aligned"].get("harmful_nll"), lv[kind].get("harmful_nll"))
            bs = _share(p.get("benign_nll"), lv["aligned"].get("benign_nll"), lv[kind].get("benign_nll"))
            ctrl = {b: par[b][i]["energy"] for b in par if b != "topk"}
            out.append(f"- {kind}, rho {p['rho']:g}: top-K parallel keeps {_f(p['energy'])} of the update's energy "
                       f"(" + ", ".join(f"{b} {_f(e)}" for b, e in ctrl.items()) + ") and reproduces "
                       f"{_f(hs)} of the fine-tune's harmful-NLL move and {_f(bs)} of its benign-NLL move.")
    return out


def _mso_lines(curves: dict, what: str) -> list[str]:
    out = []
    for pair, pts in curves.items():
        valid = [p for p in pts if p.get("mso") is not None and p.get("random")]
        if not valid:
            out.append(f"- {what} {pair}: no nonzero update")
            continue
        mid = valid[len(valid) // 2]
        above = sum(p["mso"] > p["random"] for p in valid)
        out.append(f"- {what} {pair}: MSO {_f(mid['mso'])} vs random {_f(mid['random'])} at eta {mid['eta']:g}; "
                   f"above the random baseline at {above} of {len(valid)} eta values.")
    return out


def _location(res: dict) -> list[str]:
    loc, rev, bt = res["location"], res["reverse"], res["btap"]
    v = loc["V"]
    lines = ["## Where B-TAP's harm-specific set sits", "",
             f"B-TAP set on the aligned model: {bt['total_pruned']} of {bt['total_numel']} weights "
             f"(q = {bt['q']:g}, p = {bt['p']:g}, per matrix).", "",
             R.md_table(["alignment update part", "B-TAP set", "random, same counts", "largest |V|, same counts"],
                        [["V (all of it)", _f(v["btap"], 4), _f(v["random"], 4), _f(v["largest_v"], 4)]]
                        + [[f"L Lᵀ V, rho {r}", _f(x["btap"], 4), _f(x["random"], 4), _f(x["largest_v"], 4)]
                           for r, x in loc["rank_k"].items()]), "",
             f"Share of squared mass carried (a random set's expectation: {_f(loc['expected_random'], 6)}). "
             f"The B-TAP set shares {loc['btap_vs_largest_v']['shared']} coordinates with the largest-|V| set.", ""]
    ratio = v["btap"] / v["random"] if v.get("random") else None
    lines.append(f"Reading: the B-TAP set carries {_f(ratio, 2)}× the share of ‖V‖² a random set of the same "
                 "per-matrix counts carries" + (" — it sits where alignment changed the weights most." if ratio and ratio > 2
                                                else " — it is not concentrated on the alignment update." if ratio and ratio < 1.5
                                                else "."))
    al = res["levels"]["aligned"]
    rows = [[k, r.get("total_pruned"), _f(r.get("harm_classifier")), _f(r.get("harmful_nll")),
             _f(None if r.get("harmful_nll") is None else r["harmful_nll"] - al["harmful_nll"], 4),
             _f(r.get("benign_nll")), _f(None if r.get("benign_nll") is None else r["benign_nll"] - al["benign_nll"], 4),
             _f(r.get("xstest_compliance"))] for k, r in rev.items()]
    lines += ["", "### Reverse experiment: prune each set from the aligned model", "",
              R.md_table(["set", "pruned", "harm (classifier)", "harmful NLL", "Δ", "benign NLL", "Δ",
                          "XSTest compliance"], rows), ""]
    return lines


def render(res: dict) -> str:
    cfg = res["config"]
    lines = ["# Safety subspaces next to B-TAP", "",
             f"- base `{cfg['base']}`, aligned `{cfg['aligned']}`; fine-tunes: "
             + ", ".join(f"{k} `{v['spec']}`" for k, v in res["inputs"].items() if k not in ("base", "aligned")),
             f"- {res['tensors']} tensors projected; rho {cfg['rho']}, eta {cfg['eta']}, side {cfg['side']}; "
             f"{res['evaluations']} evaluations ({cfg['limit']} judged harmful prompts, {cfg['nll_nsamples']} completions "
             f"per NLL set, {cfg['xstest_limit']} XSTest prompts, {cfg['max_new_tokens']} new tokens, greedy)",
             f"- wall time {res['timing_seconds']['total'] / 60:.1f} min", "",
             "What the paper reports: " + PAPER, ""]
    lines += _levels(res)
    lines += ["## Reading (computed from the tables below)", ""] + _selectivity(res)
    lines += _mso_lines(res["weight_overlap"]["overall"] and
                        {p: v["all"] for p, v in res["weight_overlap"]["overall"].items()}, "weight updates")
    lines += _mso_lines(res["activations"]["mean"], "activations (aligned model)")
    lines += ["", "Small evaluation sets make the judged harm noisy; the NLL shares are the steadier signal.", ""]
    lines += _projection_tables(res)
    lines += _location(res)
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in res.get("figures", [])]
    return "\n".join(lines) + "\n"
