"""The ``harmprune score`` stage: load a model and data, score, write an attribution directory.

Output (docs/design.md): ``scores.safetensors`` (keys = full parameter names, weight-shaped, float32 by
default) and ``meta.json`` (method, formula, direction, model and data fingerprints, counts,
settings, versions, wall time, peak memory). Written atomically: a failure leaves no directory.

Scaling (see ``distributed``): with ``--num-processes N`` or under ``accelerate launch`` each
process scores a shard and the raw sums are added once; only rank 0 writes. ``--device-map`` (with
``--offload-folder`` for disk) scores models larger than one device, ``--gradient-checkpointing``
trades a second forward for activation memory; neither changes the scores.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import manifest, validate
from ..core.data import DataSpec, data_fingerprint, load_records
from ..core.errors import HarmpruneError
from ..core.models import (ModelHandle, check_not_quantized, load_model, model_name,
                           parse_dtype)
from ..core.options import (DataOptions, DeviceMapOptions, FieldOptions, MethodOptions, ModelOptions,
                            OutputOptions, ScoringOptions, check_scoring)
from ..core.settings import check, check_min, opt, to_dict
from ..core.targets import DEFAULT_TARGETS
from . import distributed
from .artifact import write_scores
from .engine import WANDA_TOKENS, compute_scores
from .formulas import DIRECTIONS, FORMULAS, IMPORTANCE

SELECTION = "rows shuffled with random.Random(seed).shuffle, then the first nsamples taken"


@dataclass(kw_only=True)
class ScoreConfig(ModelOptions, DeviceMapOptions, MethodOptions, DataOptions, FieldOptions, ScoringOptions,
                  OutputOptions):
    """Settings of ``harmprune score`` (each field is also a CLI option; groups in ``core.options``)."""

    offload_folder: str | None = opt(None, help="folder for weights a device map puts on disk", role="output")
    num_processes: int = opt(1, help="data-parallel processes on this machine (each scores a shard; "
                                     "under accelerate launch the launcher's processes are used)", range=">= 1")

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        check_scoring(self)
        check(self.wanda_tokens in WANDA_TOKENS,
              f"unknown --wanda-tokens {self.wanda_tokens!r}; choose response or all")
        check_min(self, 1, "num_processes")
        check(not (self.num_processes > 1 and self.device_map),
              "--device-map cannot be combined with --num-processes: every process would hold the whole model")
        parse_dtype(self.dtype)
        parse_dtype(self.score_dtype)
        self.parsed_device_map()

    def parsed_device_map(self) -> str | dict | None:
        """``--device-map`` as transformers takes it: a strategy name or ``{module name: device}``."""
        dm = self.device_map
        if not dm or not (dm.lstrip().startswith("{") or dm.endswith(".json")):
            return dm
        try:
            value = json.loads(Path(dm).read_text() if dm.endswith(".json") else dm)
        except (OSError, json.JSONDecodeError) as e:
            raise HarmpruneError(f"--device-map {dm!r} is neither a strategy, a JSON object nor a readable "
                                 f".json file: {e}") from None
        check(isinstance(value, dict), f"--device-map {dm!r} must be a JSON object {{module: device}}")
        return value

    def data_spec(self) -> DataSpec:
        return DataSpec(data=self.data, prompt_field=self.prompt_field, response_field=self.response_field,
                        category_field=self.category_field, category=self.category)


def warn_skipped(skipped: int, total: int, max_length: int) -> None:
    """One warning line when records lost their whole response to truncation (they are not scored)."""
    if skipped:
        validate.warn(f"{skipped} of {total} records were skipped: the prompt leaves no room for a response token "
                      f"within --max-length {max_length}; raise --max-length to use them")


def select(records: list, nsamples: int, seed: int) -> list:
    """The records a run scores: a ``random.Random(seed)`` shuffle of the rows, first ``nsamples``."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in (order[:nsamples] if nsamples else order)]


def _weight_shapes(model, keys) -> dict[str, list[int]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {k: list(params[k].shape) for k in keys}


def _load(cfg: ScoreConfig, device: str):
    return load_model(cfg.model, cfg.dtype, device, cfg.parsed_device_map(), offload_folder=cfg.offload_folder)


def _launch(cfg: ScoreConfig, handle) -> Path:
    if handle is not None:
        raise HarmpruneError("--num-processes loads the model in every process: pass no model object")
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    load_records(cfg.data_spec())  # bad input fails here, once, before any process starts
    distributed.launch(cfg.num_processes, score, cfg)
    return Path(cfg.out)


def score(cfg: ScoreConfig, handle: ModelHandle | None = None, rows: list | None = None,
          extra_meta: dict | None = None, exists_ok=None) -> Path:
    """Run the stage; return the output directory. Raises HarmpruneError on bad input (nothing written).

    ``handle``: an already loaded ``cfg.model`` (recipes pass theirs: no reload, no second hash).
    ``rows``: the records of ``cfg.data`` already read (recipes pass them: the data is read once).
    ``extra_meta``: merged into meta.json (the score cache records its key there). ``exists_ok``: see
    ``manifest.atomic_dir`` (the cache accepts an equal entry another run published meanwhile).
    With ``cfg.num_processes > 1`` outside a launcher, starts that many processes (see ``distributed``).
    """
    proc = distributed.setup(cfg.device)
    if proc.world == 1 and cfg.num_processes > 1:
        return _launch(cfg, handle)
    if proc.world > 1:
        check(cfg.num_processes in (1, proc.world),
              f"--num-processes {cfg.num_processes} but the launcher started {proc.world} processes")
        check(not cfg.device_map, "--device-map cannot be combined with data-parallel processes")
    if exists_ok is None:
        manifest.check_out_dir(cfg.out, cfg.overwrite)  # fail before the slow parts
    if proc.is_main:
        manifest.banner("score", {**to_dict(cfg), "world_size": proc.world})
    t0 = time.perf_counter()
    spec = cfg.data_spec()
    rows = load_records(spec) if rows is None else rows
    fingerprint = data_fingerprint(spec, rows)
    chosen = select(rows, cfg.nsamples, cfg.seed)
    torch.manual_seed(cfg.seed)
    if handle is None:
        handle = _load(cfg, distributed.process_device(cfg.device, proc))
    model, tok = handle
    check_not_quantized(model, "score")
    scores, stats = compute_scores(model, tok, chosen, cfg.method, fmt=cfg.format, max_length=cfg.max_length,
                                   batch_size=cfg.batch_size, targets=cfg.targets, ignore=cfg.ignore,
                                   wanda_tokens=cfg.wanda_tokens, score_dtype=parse_dtype(cfg.score_dtype),
                                   progress=proc.is_main, gradient_checkpointing=cfg.gradient_checkpointing,
                                   shard=proc.shard,
                                   reduce=distributed.all_reduce_run if proc.world > 1 else None)
    if not proc.is_main:
        return Path(cfg.out)
    warn_skipped(stats["skipped"], len(chosen), cfg.max_length)
    mhash = handle.hash
    meta = {
        "method": cfg.method,
        "formula": FORMULAS[cfg.method],
        "direction": DIRECTIONS[cfg.method],
        "importance": IMPORTANCE[cfg.method],
        "model": {"spec": cfg.model, "name": model_name(cfg.model), "class": type(model).__name__,
                  "model_hash": mhash, "dtype": cfg.dtype},
        "model_hash": mhash,
        "shapes": _weight_shapes(model, scores),
        "data": {**fingerprint, "selection": SELECTION, "seed": cfg.seed,
                 "record_ids": [r.id for r in chosen]},
        "format": stats["format"],
        "nsamples": {"requested": cfg.nsamples, "available": len(rows), "selected": len(chosen),
                     "used": stats["samples"], "skipped": stats["skipped"]},
        "tokens": {"response": stats["tokens"], "input": stats["input_tokens"]},
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "world_size": proc.world,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device_map": getattr(model, "hf_device_map", None),
        "dtype": cfg.dtype,
        "score_dtype": cfg.score_dtype,
        "seed": cfg.seed,
        "targets": cfg.targets or DEFAULT_TARGETS,
        "ignore": cfg.ignore or [],
        "wanda_tokens": cfg.wanda_tokens if cfg.method == "wanda" else None,
        "mean_nll": stats["mean_nll"],
        "layers": stats["layers"],
        "layers_never_run": stats["layers_never_run"],
        "config": to_dict(cfg),
        "versions": manifest.versions(),
        "engine_seconds": stats["engine_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "peak_memory_bytes": stats["peak_memory_bytes"],  # of rank 0 when world_size > 1
        "peak_memory_kind": "cuda max allocated" if torch.cuda.is_available() and torch.cuda.max_memory_allocated()
        else "process RSS high-water mark (includes model loading)",
        **(extra_meta or {}),
    }
    with manifest.atomic_dir(cfg.out, cfg.overwrite, exists_ok=exists_ok) as tmp:
        write_scores(tmp, scores, meta)
    return Path(cfg.out)
