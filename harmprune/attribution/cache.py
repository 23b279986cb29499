"""The one score cache: ``pipeline``, ``sweep`` and ``ablate`` (and anything else) score through it.

An entry is a score directory (``scores.safetensors`` + ``meta.json``, see ``artifact``) under
``<cache dir>/<model name>/<label>-<method>-n<nsamples>-<key>``. The key is the sha256 of every
input the scores depend on: the model hash, the sha256 of the records scored (after field mapping and category filter), the method and every
scoring setting (nsamples, seed, max_length, format, dtype, score dtype, targets, ignore, wanda
tokens). Batch size and activation checkpointing do not change scores and are not in the key.

Before an entry is re-used it is validated (readable header and meta, the same key, the last
tensor readable); a broken entry is removed and recomputed. Writers never collide: each scores
into its own temporary sibling (``manifest.atomic_dir``) and renames it into place; when another
writer published a valid entry for the same key first, that entry is kept and ours is dropped (a
shared cache on a cluster file system).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from ..core import manifest
from ..core.data import DataSpec, load_records, records_sha256
from ..core.models import ModelHandle
from ..core.options import ScoringOptions
from .artifact import load_scores

KEY_FIELD = "cache_key"


def cache_key(model_hash: str, data_sha256: str, method: str, opts, dtype: str) -> dict:
    """Everything an entry's scores depend on (``opts``: a ``core.options.ScoringOptions``)."""
    return {"model_hash": model_hash, "data_sha256": data_sha256, "method": method, "nsamples": opts.nsamples,
            "seed": opts.seed, "max_length": opts.max_length, "format": opts.format, "dtype": dtype,
            "score_dtype": opts.score_dtype, "targets": sorted(opts.targets or []), "ignore": sorted(opts.ignore or []),
            "wanda_tokens": opts.wanda_tokens if method == "wanda" else None}


def entry_dir(cache_dir: str | Path, model_name: str, label: str, method: str, nsamples: int, key: dict) -> Path:
    safe = label.replace("/", "_").replace(":", "-")
    return Path(cache_dir) / model_name / f"{safe}-{method}-n{nsamples}-{manifest.sha256_json(key)[:12]}"


def valid_entry(d: Path, key: dict) -> str | None:
    """None when ``d`` is a complete entry for ``key``, else why not (one line)."""
    if not (d / "meta.json").is_file():
        return "no meta.json"
    try:
        s = load_scores(d, lazy=True)
        if s.meta.get(KEY_FIELD) not in (None, key) or s.meta.get("model_hash") != key["model_hash"]:
            return "computed for other inputs"
        names = list(s.tensors)
        if names:
            s.tensors[names[-1]].reshape(-1)[-1].item()  # a cut-short file fails here, not later
    except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed, whatever broke it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def cached_scores(handle: ModelHandle, data: str | DataSpec, method: str, opts, cache_dir: str | Path,
                  rows: list | None = None, label: str | None = None) -> Path:
    """The score directory of (``handle``'s model, ``data``, ``method``, ``opts``), computed only if
    the cache holds no valid entry.

    ``rows``: the records to score when the caller already read them (an ablation's category; the
    data is then not read again); otherwise ``data`` is read once here. ``label`` names the entry.
    """
    from .score import ScoreConfig, score

    spec = data if isinstance(data, DataSpec) else DataSpec(data=data)
    rows = load_records(spec) if rows is None else rows
    key = cache_key(handle.hash, records_sha256(rows), method, opts, handle.dtype)
    d = entry_dir(cache_dir, handle.name, label or spec.data, method, opts.nsamples, key)
    why = valid_entry(d, key) if d.exists() else "absent"
    if why is None:
        print(f"harmprune: re-using scores {d}", file=sys.stderr)
        return d
    if d.exists():
        print(f"harmprune: warning: cached scores {d} are broken ({why}); recomputing", file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)
    scoring = {f.name: getattr(opts, f.name) for f in dataclasses.fields(ScoringOptions)}
    cfg = ScoreConfig(**scoring, **dataclasses.asdict(spec), method=method, out=str(d), model=handle.spec,
                      dtype=handle.dtype, device=handle.device)
    # another run may publish the same entry while we score: its valid entry wins (manifest.atomic_dir)
    return score(cfg, handle, rows=rows, extra_meta={KEY_FIELD: key}, exists_ok=lambda p: valid_entry(p, key) is None)
