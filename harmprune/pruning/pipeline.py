"""``make prune``: score harmful and benign data (cached), prune, and show the before/after table.

One model load serves every step. Scores are cached under ``scores_dir`` keyed by the model hash,
the data hash and every setting that changes them, so re-running with other ``q``/``p`` re-uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..attribution.score import ScoreConfig, score
from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.models import DEFAULT_MODEL, load_model, model_hash, model_name
from ..core.settings import check, opt, to_dict
from ..evals.nll import response_nll
from .apply import masked
from .checkpoint import load_scores
from .select import SCOPES, random_control, select_prune_set

# The point `make sweep` recommends on the embedded model (README, "Choosing q and p"): the most
# harm-specific with benign NLL rise <= 5% and harmful rise > 0.01 nats/token.
DEFAULT_Q = 1e-4
DEFAULT_P = 1e-2


@dataclass
class ScoringSettings:
    """What the cached scores depend on besides the model and the data."""

    nsamples: int = opt(128, help="records scored per dataset, first n after a seeded shuffle (0 = all)")
    max_length: int = opt(256, help="maximum tokens per sample when scoring and evaluating")
    batch_size: int = opt(4, help="samples per forward/backward pass")
    format: str = opt("auto", help="auto, chat or raw")
    seed: int = opt(0, help="seed of sample selection and of the random control")
    scores_dir: str = opt("scores", help="cache directory for score artifacts")


@dataclass
class PruneInputs(ScoringSettings):
    """Model, data, score methods and held-out sets shared by ``pipeline`` and ``sweep``."""

    model: str = opt(DEFAULT_MODEL, help="Hub id, checkpoint directory, .gguf file or alias")
    harm: str = opt("harmful", help="data whose generation is removed (built-in name, file or hf:)")
    benign: str = opt("benign", help="data whose ability is protected")
    method: str = opt("snip", help="score of the harmful data", choices=["snip", "snip-abs", "wanda"])
    benign_method: str = opt("snip-abs", help="score of the benign data", choices=["snip", "snip-abs", "wanda"])
    scope: str = opt("matrix", help="matrix, row or global", choices=list(SCOPES))
    eval_harm: str = opt("harmful:test", help="held-out harmful completions")
    eval_benign: str = opt("benign:test", help="held-out benign completions")
    overwrite: bool = opt(False, help="replace a non-empty --out")
    dtype: str = opt("float32", help="model dtype")
    device: str = opt("cpu", help="device")

    def __post_init__(self):
        check(self.nsamples >= 0, "--nsamples must be 0 (all) or positive")
        check(self.max_length >= 2 and self.batch_size >= 1, "--max-length must be >= 2 and --batch-size >= 1")
        validate.check_device(self.device)


@dataclass
class PipelineConfig(PruneInputs):
    """Settings of ``harmprune pipeline`` (``make prune``)."""

    q: float = opt(DEFAULT_Q, help="fraction in Top_q of the harm importance")
    p: float = opt(DEFAULT_P, help="fraction protected by Top_p of the benign importance (0 = none: dangerous)")
    eval_nsamples: int = opt(0, help="held-out records per set in the table (0 = all)")
    out: str | None = opt(None, help="checkpoint directory (default: out/<model>-<settings>)")

    def __post_init__(self):
        super().__post_init__()
        validate.check_fraction(self.q, "--q")
        validate.check_fraction(self.p, "--p")
        check(self.eval_nsamples >= 0, "--eval-nsamples must be 0 (all) or positive")

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-q{self.q:g}-p{self.p:g}-{self.scope}-n{self.nsamples}"
        return Path("out") / f"{model_name(self.model)}-{tag}"


def cached_scores(model, tok, mhash: str, data: str, method: str, s: ScoringSettings, model_spec: str,
                  dtype: str = "float32") -> Path:
    """Return a score directory for (model, data, method, settings), computing it only if absent."""
    spec = DataSpec(data=data)
    fp = data_fingerprint(spec, load_records(spec))
    key = manifest.sha256_json({"model_hash": mhash, "data": fp["sha256"], "spec": data, "method": method,
                                "nsamples": s.nsamples, "max_length": s.max_length, "format": s.format,
                                "seed": s.seed, "dtype": dtype})[:12]
    safe = data.replace("/", "_").replace(":", "-")
    d = Path(s.scores_dir) / model_name(model_spec) / f"{safe}-{method}-n{s.nsamples}-{key}"
    if (d / "meta.json").is_file():
        print(f"harmprune: re-using scores {d}")
        return d
    score(ScoreConfig(method=method, out=str(d), model=model_spec, data=data, nsamples=s.nsamples,
                      max_length=s.max_length, batch_size=s.batch_size, format=s.format, seed=s.seed,
                      dtype=dtype), model=model, tokenizer=tok)
    return d


def held_out(data: str, n: int, seed: int = 0):
    rows = load_records(DataSpec(data=data))
    return rows[:n] if n else rows


def nll_row(model, tok, harm_rows, benign_rows, s: ScoringSettings) -> dict:
    kw = dict(fmt=s.format, max_length=s.max_length, batch_size=max(8, s.batch_size))
    return {"harmful_nll": response_nll(model, tok, harm_rows, desc="nll harmful", **kw)["nll"],
            "benign_nll": response_nll(model, tok, benign_rows, desc="nll benign", **kw)["nll"]}


def with_deltas(row: dict, base: dict) -> dict:
    """Add NLL increases over ``base`` (nats/token) and harm-specificity = Δharmful / Δbenign."""
    dh, db = row["harmful_nll"] - base["harmful_nll"], row["benign_nll"] - base["benign_nll"]
    return {**row, "d_harmful": dh, "d_benign": db, "benign_rel": db / base["benign_nll"],
            "specificity": dh / db if db > 0 else (float("inf") if dh > 0 else float("nan"))}


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'model':<10} {'pruned':>8} {'harmful NLL':>12} {'Δ':>8} {'benign NLL':>11} {'Δ':>8} {'Δh/Δb':>7}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r.get('pruned', 0):>8} {r['harmful_nll']:>12.4f} {r.get('d_harmful', 0):>+8.4f} "
                     f"{r['benign_nll']:>11.4f} {r.get('d_benign', 0):>+8.4f} {r.get('specificity', float('nan')):>7.2f}")
    return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Score (cached), prune, save ``cfg.out_dir()``, and print/write the before/after NLL table."""
    from .prune import PruneConfig, prune_loaded

    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    for w in validate.fraction_warnings(cfg.q, cfg.p):
        validate.warn(w)
    manifest.banner("pipeline", {**to_dict(cfg), "out": str(out)})
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    mhash = model_hash(model)
    harm_dir = cached_scores(model, tok, mhash, cfg.harm, cfg.method, cfg, cfg.model, cfg.dtype)
    benign_dir = cached_scores(model, tok, mhash, cfg.benign, cfg.benign_method, cfg, cfg.model, cfg.dtype) \
        if cfg.p > 0 else None
    harm, benign = load_scores(harm_dir, lazy=True), (load_scores(benign_dir, lazy=True) if benign_dir else None)
    harm_rows, benign_rows = held_out(cfg.eval_harm, cfg.eval_nsamples), held_out(cfg.eval_benign, cfg.eval_nsamples)

    base = nll_row(model, tok, harm_rows, benign_rows, cfg)
    mask, stats = select_prune_set(harm.tensors, benign.tensors if benign else None, harm.method,
                                   benign.method if benign else None, cfg.q, cfg.p, cfg.scope)
    rand = random_control(mask, cfg.seed)  # what select_prune_set(..., "random") gives, without re-selecting
    rows = {"original": {**base, "pruned": 0}}
    for name, m in (("pruned", mask), ("random", rand)):
        with masked(model, m):
            rows[name] = {**with_deltas(nll_row(model, tok, harm_rows, benign_rows, cfg), base),
                          "pruned": stats["total_pruned"]}
    table = {"eval": {"harmful": cfg.eval_harm, "benign": cfg.eval_benign, "rows": [len(harm_rows), len(benign_rows)],
                      "metric": "mean response NLL, nats/token"}, "rows": rows}
    prune_cfg = PruneConfig(harm=str(harm_dir), benign=str(benign_dir) if benign_dir else None, q=cfg.q, p=cfg.p,
                            out=str(out), model=cfg.model, scope=cfg.scope, seed=cfg.seed,
                            overwrite=cfg.overwrite, dtype=cfg.dtype, device=cfg.device)
    prune_loaded(prune_cfg, model, harm, benign, mask, stats, extra={"before_after": table})
    text = format_table(rows)
    print(f"\nheld-out NLL ({len(harm_rows)} harmful, {len(benign_rows)} benign; nats/token)\n{text}")
    (out / "before_after.md").write_text("```\n" + text + "\n```\n")
    return out
