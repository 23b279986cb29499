"""``make subspaces``: the safety-subspace study (Ponkshe et al. 2026) next to B-TAP, on one
(base, aligned) pair.

1. Fine-tunes of the aligned model A (LoRA merged, or ``--ft-full``) on useful, harmful and
   contaminated (useful + harmful) shipped data, cached under ``--finetune-dir``; or named with
   ``--useful-model`` etc. (e.g. the paper's MetaMathQA / BeaverTails fine-tunes on a GPU).
2. For each fine-tune F: the rho grid × {topk, randk, gaussian} × {parallel, orth} projections of
   U = F - A onto the alignment update V = A - B (SVD of each matrix once for the whole study),
   each measured for utility and harm (``evaluate``), with the energy kept.
3. MSO of weight updates (F_harmful - A, F_useful - A, B - A) and of activations of prompt sets.
4. B-TAP's harm-specific set on A: the share of ‖V‖² and of ‖L Lᵀ V‖² it carries vs random and
   largest-|V| sets of the same per-matrix counts, and the reverse experiment (prune each, measure).

One loaded copy of A serves every measurement: other models' tensors are streamed into it in
place and A's are streamed back. Writes ``results.json``, ``report.md`` and figures atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ...core import manifest
from ...core.data import load
from ...core.models import load_model, model_hash, model_name
from ...core.settings import check, opt, to_dict
from ...evals.generation import GenConfig
from ...pruning.apply import masked
from ...subspace.projection import BASES, MODES, total_energy
from . import plots, report
from .activations import ActivationsConfig, measure as measure_activations
from ...core.tensors import TensorReader, check_same_layout
from .checkpoints import checkpoint_info, select_tensors
from .evaluate import Evaluator, eval_sets
from .location import btap_set, locate, set_overlap, stats_of
from ...core import validate
from ...core.models import resolve_device
from ...core.options import (PAPER_ETAS, PAPER_RHOS, CacheOptions, EvalBenignOptions, EvalHarmOptions,  # noqa: F401
                             GenBatchOptions, HarmJudgeOptions, LimitOptions, NewTokensOptions, NSamplesOptions,
                             OutputOptions,
                             PairOptions, PassOptions, RuntimeOptions, ScoringOptions, SeedOptions, SelectionOptions,
                             SubspaceOptions, TargetOptions, check_selection, pick)
from .overlap import weight_overlap
from .project import FactorCache, apply_projection, check_parameters, restore_aligned

FINETUNES = ("useful", "harmful", "contaminated")


@dataclass(kw_only=True)
class StudyConfig(PairOptions, SubspaceOptions, TargetOptions, EvalHarmOptions, EvalBenignOptions, LimitOptions,
                  HarmJudgeOptions, NewTokensOptions, GenBatchOptions, SelectionOptions, NSamplesOptions, PassOptions,
                  RuntimeOptions, SeedOptions, OutputOptions, CacheOptions):
    """Settings of ``harmprune subspace study`` (``make subspaces``); ``--full-grid`` = the paper's grid.

    ``make subspaces`` passes the CPU-sized settings (``--limit 8 --judge classifier,keyword
    --max-new-tokens 32 --nsamples 32 --batch-size 8 --gen-batch-size 8 --max-length 192``): ``--limit`` harmful prompts are
    judged per model state, ``--nsamples`` records are scored per set for the B-TAP set (``--q``/``--p``),
    ``--max-length`` bounds fine-tuning, scoring, NLL and prompts. Sizing: with 4x its NLL rows, 256
    tokens and 12 + 12 prompts, one evaluation of the 135M model took 97 s (1 thread on the shared 2-core
    CPU, 2026-11-29; NLL 64 s, generation 31 s); the default grid is 2 fine-tunes x 3 bases x 2 modes x
    3 rhos = 36 projections + 5 levels + 3 reverse evaluations. ``--out`` defaults to
    results/subspaces-<aligned>.
    """

    useful_data: str = opt("benign", help="useful fine-tuning data (shipped XSTest compliance completions)", role="input")
    harmful_data: str = opt("harmful", help="harmful fine-tuning data (shipped harmful completions)", role="input")
    useful_model: str | None = opt(None, help="an existing useful fine-tune of A (skips training)", role="input")
    harmful_model: str | None = opt(None, help="an existing harmful fine-tune of A (skips training)", role="input")
    contaminated_model: str | None = opt(None, help="an existing contaminated fine-tune of A (skips training)", role="input")
    finetune_dir: str = opt("finetunes", help="cache directory of the study's fine-tunes", role="output")
    ft_full: bool = opt(False, help="full fine-tuning instead of LoRA (merged)")
    ft_limit: int = opt(64, help="records per fine-tune (contaminated: this many of each set)", range=">= 1")
    ft_steps: int = opt(16, help="optimizer steps per fine-tune", range=">= 1")
    ft_lr: float = opt(2e-4, help="fine-tuning learning rate", range="> 0")
    ft_lora_r: int = opt(16, help="LoRA rank of the study's fine-tunes", range=">= 1")
    ft_batch_size: int = opt(4, help="records per fine-tuning step", range=">= 1")
    project: list[str] = opt(["harmful", "contaminated"], help="fine-tunes whose updates are projected "
                             "(harmful, useful, contaminated)")
    bases: list[str] = opt(list(BASES), help="bases: topk randk gaussian")
    modes: list[str] = opt(list(MODES), help="projections: parallel orth")
    full_grid: bool = opt(False, help="the paper's grid: rho 0.01 0.25 0.5 0.75 0.99, eta 0.01 0.1 ... 0.9 0.99")
    nll_nsamples: int = opt(8, help="held-out completions per NLL set (0 = all)", range=">= 0")
    xstest_limit: int = opt(8, help="XSTest safe prompts per model state (0 = all)", range=">= 0")
    act_sets: list[str] = opt(["harmful", "harmbench", "xstest"], help="prompt sets of the activation MSO")
    act_nsamples: int = opt(48, help="prompts per activation set", range=">= 1")
    figures: bool = opt(True, help="draw the figures (PNG) next to results.json")

    def __post_init__(self):
        self.device = resolve_device(self.device)  # SVDs and tensors go straight to it
        check_selection(self)  # (the study selects per matrix)
        validate.check_device(self.device)
        if self.full_grid:
            self.rho, self.eta = list(PAPER_RHOS), list(PAPER_ETAS)
        check(all(0 < r <= 1 for r in self.rho) and all(0 < e <= 1 for e in self.eta),
              "--rho and --eta values must be in (0, 1]")
        for name, values, allowed in (("--project", self.project, FINETUNES), ("--bases", self.bases, BASES),
                                      ("--modes", self.modes, MODES)):
            bad = [v for v in values if v not in allowed]
            check(not bad, f"unknown {name} {', '.join(bad)}; choose from {', '.join(allowed)}")
        check(self.ft_limit >= 1 and self.ft_steps >= 1, "--ft-limit and --ft-steps must be >= 1")
        check_selection(self)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / f"subspaces-{model_name(self.aligned)}"

    def gen(self) -> GenConfig:
        return pick(GenConfig, self)


# ---------------------------------------------------------------- fine-tunes (cached)


def _contaminated_file(cfg: StudyConfig, d: Path) -> str:
    from ...attribution.score import select

    rows = [r for data in (cfg.useful_data, cfg.harmful_data) for r in select(load(data), cfg.ft_limit, cfg.seed)]
    path = d / "contaminated.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in rows))
    return str(path)


def finetune_spec(cfg: StudyConfig, kind: str) -> str:
    """A checkpoint spec of the ``kind`` fine-tune: the one named, or a cached / new run."""
    from ...finetune.train import FinetuneConfig, finetune

    given = getattr(cfg, f"{kind}_model")
    if given:
        return given
    settings = {"aligned": cfg.aligned, "kind": kind, "data": [cfg.useful_data, cfg.harmful_data], "full": cfg.ft_full,
                "limit": cfg.ft_limit, "steps": cfg.ft_steps, "lr": cfg.ft_lr, "r": cfg.ft_lora_r,
                "batch": cfg.ft_batch_size, "max_length": cfg.max_length, "seed": cfg.seed, "dtype": cfg.dtype}
    d = Path(cfg.finetune_dir) / model_name(cfg.aligned) / f"{kind}-{manifest.sha256_json(settings)[:12]}"
    ckpt = d / "run" if cfg.ft_full else d / "run" / "merged"
    if (ckpt / "config.json").is_file():
        print(f"harmprune: re-using fine-tune {ckpt}")
        return str(ckpt)
    d.mkdir(parents=True, exist_ok=True)
    manifest.write_json(d / "settings.json", settings)
    data = {"useful": cfg.useful_data, "harmful": cfg.harmful_data}.get(kind) or _contaminated_file(cfg, d)
    limit = 2 * cfg.ft_limit if kind == "contaminated" else cfg.ft_limit
    finetune(FinetuneConfig(train_data=data, out=str(d / "run"), model=cfg.aligned, full=cfg.ft_full,
                            merge=not cfg.ft_full, lr=cfg.ft_lr, lora_r=cfg.ft_lora_r, lora_alpha=2.0 * cfg.ft_lora_r,
                            max_steps=cfg.ft_steps, train_batch_size=cfg.ft_batch_size, grad_accum=1, warmup_steps=0,
                            train_max_length=cfg.max_length,
                            limit=limit, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device, save_steps=0,
                            overwrite=True))
    return str(ckpt)


# ---------------------------------------------------------------- model states


def load_state(params: dict, reader: TensorReader) -> None:
    """Stream every tensor of ``reader`` that is a parameter into the loaded model, in place."""
    import torch

    with torch.no_grad():
        for name in reader.names():
            if name in params:
                p = params[name]
                p.data.copy_(reader.get(name, p.device).to(p.dtype))


def projection_grid(cfg, params, aligned, readers, cache, evaluate, timing) -> dict:
    """``{finetune: {mode: {basis: [{rho, energy, k_total, **metrics}]}}}``."""
    out = {}
    t = time.perf_counter()
    for kind in cfg.project:
        out[kind] = {mode: {b: [] for b in cfg.bases} for mode in cfg.modes}
        settings = [(m, b, r) for m in cfg.modes for b in cfg.bases for r in cfg.rho]
        for mode, basis, rho in tqdm(settings, desc=f"projections of the {kind} update"):
            recs = apply_projection(params, aligned, readers[kind], cache, rho, basis, mode,
                                    desc=f"{kind} {basis} {mode} rho={rho:g}")
            out[kind][mode][basis].append({"rho": rho, "energy": total_energy(recs)["fraction"],
                                           "k_total": sum(r["k"] for r in recs.values()), **evaluate()})
    restore_aligned(params, aligned)
    timing["projections"] = time.perf_counter() - t
    return out


def run_subspace_study(cfg: StudyConfig) -> Path:
    """Run the study; write results.json, report.md and the figures; return the output directory."""
    t0 = time.perf_counter()
    out = cfg.out_dir()
    manifest.check_out_dir(out, cfg.overwrite)
    manifest.banner("subspace study", {**to_dict(cfg), "out": str(out)})
    timing: dict[str, float] = {}
    specs = {kind: finetune_spec(cfg, kind) for kind in FINETUNES}
    timing["finetunes"] = time.perf_counter() - t0
    sets = eval_sets(cfg.eval_harm, cfg.eval_benign, cfg.limit, cfg.nll_nsamples, cfg.xstest_limit, cfg.seed)
    with TensorReader(cfg.base, "base") as base, TensorReader(cfg.aligned, "aligned") as aligned:
        readers = {k: TensorReader(s, k).__enter__() for k, s in specs.items()}
        try:
            check_same_layout([base, aligned, *readers.values()])
            names = select_tensors(aligned.shapes, cfg.targets, cfg.ignore)
            handle = load_model(cfg.aligned, cfg.dtype, cfg.device)
            model, tok = handle
            all_params = dict(model.named_parameters(remove_duplicate=False))
            params = check_parameters(model, names, aligned.shapes)
            evaluate = Evaluator(model, tok, sets, cfg.judge, cfg.gen(), cfg.max_length, cfg.batch_size)
            results = {"config": to_dict(cfg), "versions": manifest.versions(), "data": sets.data,
                       "inputs": {r.label: checkpoint_info(r) for r in (base, aligned, *readers.values())},
                       "model_hash": {"aligned": model_hash(model)}, "tensors": len(names), "levels": {}}
            t = time.perf_counter()
            results["levels"]["aligned"] = evaluate()
            for label, reader in (("base", base), *readers.items()):
                load_state(all_params, reader)
                results["levels"][label] = evaluate()
            load_state(all_params, aligned)
            timing["levels"] = time.perf_counter() - t
            cache = FactorCache(base, aligned, cfg.seed, cfg.side, cfg.device)
            results["projections"] = projection_grid(cfg, params, aligned, readers, cache, evaluate, timing)
            timing["svd"] = cache.seconds

            t = time.perf_counter()
            results["weight_overlap"] = weight_overlap(base, aligned, readers["harmful"], readers["useful"], names,
                                                       cfg.eta, cfg.device)
            timing["weight_overlap"] = time.perf_counter() - t
            t = time.perf_counter()
            act_cfg = pick(ActivationsConfig, cfg, out=str(out), model=cfg.aligned, sets=cfg.act_sets,
                           nsamples=cfg.act_nsamples)
            results["activations"], results["data"]["activations"] = measure_activations(model, tok, act_cfg)
            timing["activations"] = time.perf_counter() - t

            t = time.perf_counter()
            # --targets/--ignore choose the projected tensors; the B-TAP set scores every decoder linear
            opts = pick(ScoringOptions, cfg, format="auto", targets=[], ignore=[])
            mask, results["btap"] = btap_set(handle, opts, cfg.scores_dir, cfg.harmful_data, cfg.useful_data, cfg.q,
                                             cfg.p, cfg.selection)
            loc, rand, largest = locate(mask, base, aligned, cache, cfg.rho, cfg.seed, cfg.device)
            results["location"] = {**loc, "btap_vs_largest_v": set_overlap(mask, largest)}
            results["reverse"] = {}
            for label, m in (("btap", mask), ("largest_v", largest), ("random", rand)):
                with masked(model, {k: v.to(all_params[k].device) for k, v in m.items()}):
                    results["reverse"][label] = {**evaluate(), **stats_of(m)}
            timing["btap"] = time.perf_counter() - t
        finally:
            for r in readers.values():
                r.__exit__(None, None, None)
    timing["total"] = time.perf_counter() - t0
    results["timing_seconds"] = timing
    results["evaluations"] = evaluate.calls
    with manifest.atomic_dir(out, cfg.overwrite) as tmp:
        results["figures"] = figures(results, tmp) if cfg.figures else []
        manifest.write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(report.render(results))
        manifest.write_config(tmp, "subspace study", cfg, out=str(out))
    print(f"harmprune: subspace study written to {out} ({timing['total'] / 60:.1f} min, "
          f"{evaluate.calls} evaluations)")
    return out


def figures(results: dict, d: Path) -> list[str]:
    """Every figure of the study; returns the file names."""
    from .evaluate import METRICS

    files = []
    lv = results["levels"]
    for kind, rows in results["projections"].items():
        curve = {b: {m: [{"rho": p["rho"], "fraction": p["energy"]} for p in rows[m][b]] for m in rows}
                 for b in next(iter(rows.values()))}
        files.append(plots.energy_figure(_complete(curve), d / f"energy_{kind}.png",
                                         f"energy of the {kind} update kept"))
        shown = {m: f"{label}\n({direction})" for m, (label, direction) in METRICS.items()
                 if any(p.get(m) is not None for md in rows.values() for b in md.values() for p in b)}
        files.append(plots.projection_figure(rows, {m: {"aligned": lv["aligned"].get(m),
                                                        f"{kind} fine-tune": lv[kind].get(m)} for m in shown},
                                             shown, d / f"projections_{kind}.png",
                                             f"utility and harm of projected {kind} updates"))
    files.append(plots.weight_mso_figure(results["weight_overlap"], d / "mso_weights.png"))
    files.append(plots.mso_figure(results["activations"]["mean"], d / "mso_activations.png",
                                  f"activation MSO, aligned model, blocks {results['activations']['layers']}"))
    files.append(plots.location_figure(results["location"], d / "btap_location.png",
                                       "share of the alignment update's squared mass on the B-TAP set"))
    return files


def _complete(curve: dict) -> dict:
    """energy_figure draws both modes: a mode not run gets an empty series."""
    return {b: {m: modes.get(m, []) for m in MODES} for b, modes in curve.items()}
