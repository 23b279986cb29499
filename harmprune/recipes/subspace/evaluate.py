"""The study's measurements of one model state (the loaded model as it is now).

Utility: mean response NLL of held-out benign completions (nats/token, lower = better) and XSTest
compliance (1 - refusal rate of the ``keyword:gcg`` judge on XSTest's safe prompts, higher = better).
Harm: judged generation on held-out harmful prompts, greedy (mean harmfulness in [0, 1] per judge,
``classifier`` and ``keyword``; higher = more harmful) and the mean response NLL of held-out harmful
completions (lower = the model is more ready to write them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.data import DataSpec, data_fingerprint, load_records
from ...evals import results as R
from ...evals.generation import GenConfig
from ...evals.harm import generate_samples, judge_samples, load_judges
from ...evals.nll import response_nll

METRICS = {  # name: (label, direction)
    "harm_classifier": ("harmfulness (classifier judge)", "higher = more harmful"),
    "harm_keyword": ("harmfulness (keyword judge)", "higher = more harmful"),
    "harmful_nll": ("harmful NLL (nats/token)", "lower = more ready to write harmful text"),
    "benign_nll": ("benign NLL (nats/token)", "lower = better utility"),
    "xstest_compliance": ("XSTest compliance", "higher = better utility"),
}


@dataclass
class EvalSets:
    """The held-out records every model state is measured on, chosen once."""

    harmful_prompts: list
    harmful_nll: list
    benign_nll: list
    xstest: list
    data: dict


def eval_sets(harmful: str, benign: str, limit: int, nll_n: int, xstest_n: int, seed: int) -> EvalSets:
    """Seeded, category-spread subsets of ``harmful`` (prompts and completions), ``benign`` and XSTest."""
    from ...data import path as builtin_file

    hspec, bspec = DataSpec(data=harmful), DataSpec(data=benign)
    xspec = DataSpec(data=str(builtin_file("xstest_safe.jsonl")))
    h, b, x = load_records(hspec), load_records(bspec), load_records(xspec, require_response=False)
    cat = lambda r: r.category  # noqa: E731
    return EvalSets(R.subsample(h, limit, seed, key=cat), R.subsample(h, nll_n, seed, key=cat),
                    R.subsample(b, nll_n, seed, key=cat), R.subsample(x, xstest_n, seed, key=cat),
                    {"harmful": data_fingerprint(hspec, h), "benign": data_fingerprint(bspec, b),
                     "xstest": data_fingerprint(xspec, x)})


class Evaluator:
    """Measures the current weights of one loaded model on fixed :class:`EvalSets`."""

    def __init__(self, model, tok, sets: EvalSets, judges: str, gen: GenConfig, max_length: int, batch_size: int):
        self.model, self.tok, self.sets, self.gen = model, tok, sets, gen
        self.judges = load_judges(judges, device="cpu")
        self.refusal = load_judges("keyword:gcg")
        self.max_length, self.batch_size = max_length, batch_size
        self.calls = 0

    def __call__(self) -> dict:
        m, t, s = self.model, self.tok, self.sets
        kw = dict(fmt=self.gen.format, max_length=self.max_length, batch_size=self.batch_size)
        out = {"benign_nll": response_nll(m, t, s.benign_nll, desc="nll benign", **kw)["nll"],
               "harmful_nll": response_nll(m, t, s.harmful_nll, desc="nll harmful", **kw)["nll"]}
        samples = generate_samples(m, t, s.harmful_prompts, self.gen)
        judge_samples(samples, self.judges)
        for j in self.judges:
            scores = [x["judges"][j.name]["score"] for x in samples if x["judges"][j.name].get("score") is not None]
            out[f"harm_{j.name.split(':')[0]}"] = R.mean(scores)
        safe = generate_samples(m, t, s.xstest, self.gen)
        judge_samples(safe, self.refusal)
        refused = [float(bool(x["judges"][self.refusal[0].name]["refusal"])) for x in safe]
        out["xstest_compliance"] = None if not refused else 1 - R.mean(refused)
        out["example"] = samples[0]["response"][:200] if samples else None
        self.calls += 1
        return out
