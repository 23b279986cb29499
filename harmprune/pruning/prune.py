"""The prune stage: scores in, a loadable pruned checkpoint with its mask and provenance out.

``prune(PruneConfig(...))`` and ``apply_mask_stage(ApplyMaskConfig(...))`` are both the Python
API and the CLI commands ``harmprune prune`` / ``harmprune apply-mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.errors import HarmpruneError
from ..core.models import DTYPES, ModelHandle, check_not_quantized, load_model
from ..core.options import (ModelOptions, OutputOptions, PresetOptions, ScopeOptions, SeedOptions, SelectionOptions,
                            check_selection)
from ..core.settings import check, opt, to_dict
from ..attribution.formulas import IMPORTANCE
from .apply import ACTIONS, apply_mask, masked
from .checkpoint import CONFIG_FILE, Scores, load_mask, load_scores, original_tokenizer, save_checkpoint
from .select import CONTROLS, SCOPES, check_second_band, mask_stats, select_prune_set


@dataclass(kw_only=True)
class PruneConfig(ModelOptions, SelectionOptions, ScopeOptions, SeedOptions, OutputOptions, PresetOptions):
    """Settings of ``harmprune prune``; ``seed`` seeds the random control."""

    harm_scores: str = opt(help="score directory of the data to remove (harmful completions)", deprecated=("--harm",), role="input")
    benign_scores: str | None = opt(None, help="score directory of benign data (required unless --p 0)",
                                    deprecated=("--benign",), role="input")
    control: str = opt("none", help="prune a same-size control instead of the harm-specific set", choices=CONTROLS)
    action: str = opt("zero", help="zero the selected weights, or scale them by --alpha", choices=ACTIONS)
    alpha: float | None = opt(None, help="factor for --action scale", range="finite")
    # not ModelOptions.dtype: the model must be loaded as it was scored, or its hash differs
    dtype: str | None = opt(None, help="dtype to load and save the model in (default: the dtype the scores were "
                                       "computed in, else float32)")

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        check(bool(self.harm_scores), "--harm-scores is required")
        check_selection(self)
        check(self.p == 0 or self.benign_scores is not None, "--benign-scores is required unless --p 0")
        check(self.scope in SCOPES, f"--scope must be one of {SCOPES}")
        check(self.control in CONTROLS, f"--control must be one of {CONTROLS}")
        if self.control == "second-band":
            check_second_band(self.q, self.p)
        check(self.action in ACTIONS, f"--action must be one of {ACTIONS}")
        check(self.action != "scale" or self.alpha is not None, "--action scale needs --alpha")
        check(self.action == "scale" or self.alpha is None, "--alpha only applies with --action scale")
        validate.check_finite(self.alpha, "--alpha")  # nan/inf would be written into the weights
        validate.check_device(self.device)


@dataclass(kw_only=True)
class ApplyMaskConfig(ModelOptions, OutputOptions):
    """Settings of ``harmprune apply-mask``: ``--model`` is the checkpoint to prune (e.g. after fine-tuning)."""

    mask: str = opt(help="mask.safetensors (or a pruned checkpoint directory holding one)", role="input")

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        validate.check_device(self.device)


def _check_scores_agree(harm: Scores, benign: Scores | None) -> None:
    if benign is None:
        return
    hs, bs = harm.meta["shapes"], benign.meta["shapes"]
    if hs != bs:
        diff = sorted(k for k in set(hs) | set(bs) if hs.get(k) != bs.get(k))
        raise HarmpruneError(f"{harm.path} and {benign.path} cover different weights, e.g. {diff[0]}")
    if harm.meta["model_hash"] != benign.meta["model_hash"]:
        raise HarmpruneError(f"{harm.path} and {benign.path} were computed for different models (model_hash differs)")


def check_scores_match(handle: ModelHandle, scores: Scores) -> None:
    """Refuse scores that were not computed for this exact model (keys, shapes, weights hash)."""
    params = dict(handle.model.named_parameters(remove_duplicate=False))
    for name, shape in scores.meta["shapes"].items():
        if name not in params:
            raise HarmpruneError(f"{scores.path}: {name} is not a parameter of the loaded model; "
                                 "the scores were computed for another architecture")
        if list(params[name].shape) != list(shape):
            raise HarmpruneError(f"{scores.path}: {name} has shape {list(shape)} but the model's is "
                                 f"{list(params[name].shape)}")
    h = handle.hash
    if scores.meta["model_hash"] != h:
        hint = f" (scores dtype {scores.meta['dtype']})" if scores.meta.get("dtype") else ""
        raise HarmpruneError(f"{scores.path} was computed for a different model{hint}: model_hash "
                             f"{scores.meta['model_hash'][:12]} != {h[:12]} of the loaded model; re-score this model")


def _direction(method: str) -> str:
    return f"{IMPORTANCE[method]} ({method}): larger = more important"


def _scores_dtype(meta: dict) -> str:
    """The dtype the scored model ran in (model_hash covers dtypes, so loading it the same way matters)."""
    name = str(meta.get("dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _summary(stats: dict, out: Path, what: str) -> None:
    types = ", ".join(f"{t} {c}" for t, c in stats["per_module_type"].items())
    print(f"harmprune: {what} {stats['total_pruned']} of {stats['total_numel']} weights "
          f"({stats['total_fraction']:.3e}) in {len(stats['per_matrix'])} matrices -> {out}")
    print(f"  per module type: {types}")


def prune(cfg: PruneConfig) -> Path:
    """Select ``Top_q(I_harm) \\ Top_p(I_benign)`` (or a control of the same size), apply it and
    write ``cfg.out`` = HF checkpoint + ``mask.safetensors`` + ``prune_config.json``. Returns ``cfg.out``."""
    manifest.check_out_dir(cfg.out, cfg.overwrite)  # fail before the slow part
    for w in validate.fraction_warnings(cfg.q, cfg.p):
        validate.warn(w)
    manifest.banner("prune", to_dict(cfg))
    harm = load_scores(cfg.harm_scores, lazy=True)  # one matrix in memory at a time
    benign = load_scores(cfg.benign_scores, lazy=True) if cfg.benign_scores else None
    _check_scores_agree(harm, benign)
    dtype = cfg.dtype or _scores_dtype(harm.meta)
    handle = load_model(cfg.model, dtype=dtype, device=cfg.device)
    check_not_quantized(handle.model, "prune")
    for s in (harm, benign):
        if s is not None:
            check_scores_match(handle, s)
    params = dict(handle.model.named_parameters(remove_duplicate=False))
    weights = {n: params[n] for n in harm.tensors} if cfg.control == "magnitude" else None
    mask, stats = select_prune_set(harm.tensors, benign.tensors if benign else None, harm.method,
                                   benign.method if benign else None, cfg.q, cfg.p, cfg.scope,
                                   cfg.control, cfg.seed, weights)
    return prune_loaded(cfg, handle, harm, benign, mask, stats, dtype=dtype)


def prune_loaded(cfg: PruneConfig, handle: ModelHandle, harm: Scores, benign: Scores | None, mask: dict,
                 stats: dict, extra: dict | None = None, dtype: str | None = None) -> Path:
    """Save the handle's model with ``mask`` applied (``cfg.action``) to ``cfg.out``, for callers that
    already hold the model, the scores and ``select_prune_set``'s ``(mask, stats)``.

    The scores are checked against the model first (its hash is the handle's, computed once); the
    model is restored to its original weights on return. ``extra`` is merged into
    ``prune_config.json`` (e.g. a before/after table).
    """
    model = handle.model
    check_not_quantized(model, "prune")
    for s in (harm, benign):
        if s is not None:
            check_scores_match(handle, s)
    dtype = dtype or cfg.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    config = {
        "stage": "prune",
        # --overwrite is how the file was written, not what it holds: left out so reruns are byte-identical
        "settings": {**{k: v for k, v in to_dict(cfg).items() if k != "overwrite"}, "dtype": dtype},
        "model": {"spec": cfg.model, "model_hash": harm.meta["model_hash"]},
        "scores": {role: {"path": str(s.path), "sha256": s.sha256, "meta": s.meta}
                   for role, s in (("harm", harm), ("benign", benign)) if s is not None},
        "selection": "control:" + cfg.control if cfg.control != "none" else "Top_q(I_harm) \\ Top_p(I_benign)",
        "importance": {"harm": _direction(harm.method), "benign": _direction(benign.method) if benign else None},
        "tie_rule": "lowest flat index; global scope orders matrices by key order of the scores file",
        **stats,
        **(extra or {}),
        "versions": manifest.versions(),
    }
    with masked(model, mask, cfg.action, cfg.alpha):
        out = save_checkpoint(cfg.out, model, original_tokenizer(cfg.model), mask, config, cfg.overwrite)
    _summary(stats, out, "pruned" if cfg.action == "zero" else f"scaled by {cfg.alpha}")
    return out


def apply_mask_stage(cfg: ApplyMaskConfig) -> Path:
    """Zero a saved mask in another checkpoint of the same architecture and save it like ``prune``."""
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    manifest.banner("apply-mask", to_dict(cfg))
    mask = load_mask(cfg.mask)
    mask_path = Path(cfg.mask) / "mask.safetensors" if Path(cfg.mask).is_dir() else Path(cfg.mask)
    handle = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model = handle.model
    check_not_quantized(model, "prune")
    source_hash = handle.hash
    apply_mask(model, mask, "zero")  # checks keys, shapes and ties first
    source_cfg = mask_path.parent / CONFIG_FILE
    stats = mask_stats(mask)
    config = {
        "stage": "apply-mask",
        "settings": to_dict(cfg),
        "model": {"spec": cfg.model, "model_hash": source_hash},
        "source_mask": {"path": str(mask_path), "sha256": manifest.sha256_file(mask_path),
                        "prune_config": manifest.read_json(source_cfg) if source_cfg.is_file() else None},
        **stats,
        "versions": manifest.versions(),
    }
    out = save_checkpoint(cfg.out, model, original_tokenizer(cfg.model), mask, config, cfg.overwrite)
    _summary(stats, out, "pruned")
    return out

