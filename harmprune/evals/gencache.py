"""The judged-generation cache: replies and their judges' verdicts, re-used like scores.

``make prune`` with another ``q`` or ``p`` measures the same original model again: its replies
(harmful prompts without and under the prefill attack, XSTest) and their verdicts come from here;
only the pruned model and the random control are generated and judged again.

An entry is a directory ``<cache dir>/<model name>/<label>-<key sha[:16]>/`` holding
- ``samples.json``: ``{"key": key, "samples": [...]}``, the sample dicts ``evals.harm.generate_samples``
  returns (text, with a prefill also ``prefill`` and ``continuation``); the key (:func:`gen_key`) is
  the *effective* weights' hash (the model hash, and for a masked variant the mask's digest:
  :func:`effective_hash`), the hash of the records and of the exact token ids fed to the model
  (prompt, chat template, system prompt, forced prefill), and every generation setting (attack,
  prefill tokens, max new tokens, temperature, top-p, n, seed, format, backend, device type; the
  batch size only when sampling, since greedy replies do not depend on it), and the torch and
  transformers versions;
- ``verdicts-<judge sha[:12]>.json``, one per judge: ``{"key": {"generation": sha of the entry's key,
  "judge": the judge's identity, "views": [...]}, "verdicts": {view: [verdict dict or null per sample]}}``.
  A judge's identity (``judge.identity()``) names what its verdicts depend on (the keyword list's
  strings, the classifier's weights, the evaluator's weights hash, dtype and device); a judge without
  one (a remote ``openai:`` judge) is never cached.
Files are JSON (never pickle) written atomically (a temporary sibling, then ``os.replace``); every
reader validates the key and the shape against what it expects, and a broken or mismatched file is
recomputed with a one-line notice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from ..core.manifest import sha256_json

SCHEMA = 1
SAMPLES_FILE = "samples.json"
VERDICT_FIELDS = ("score", "refusal", "raw", "error")


# ---------------------------------------------------------------- keys


def mask_digest(mask: dict | None) -> str | None:
    """sha256 of a mask's selected entries (names, shapes, flat indices); None for no mask or an
    all-false one (the weights are those of the unmasked model)."""
    import torch

    h, any_set = hashlib.sha256(), False
    for name in sorted(mask or {}):
        m = mask[name]
        idx = m.reshape(-1).nonzero().squeeze(1).to(device="cpu", dtype=torch.int64)
        if idx.numel() == 0:
            continue
        any_set = True
        h.update(f"{name}:{tuple(m.shape)}:{idx.numel()}".encode())
        h.update(idx.numpy().tobytes())
    return h.hexdigest() if any_set else None


def effective_hash(model_hash: str, mask: dict | None, action: str = "zero") -> str:
    """The hash of the weights a model has under ``mask`` (``pruning.apply.masked``): the model's own
    hash when nothing is masked, else a hash of (model hash, mask digest, action). ``model_hash``
    must be taken on the unmasked model (``core.models.ModelHandle.hash`` is, and is not updated
    inside ``masked``)."""
    digest = mask_digest(mask)
    return model_hash if digest is None else sha256_json({"model_hash": model_hash, "mask": digest, "action": action})


def records_sha256(records) -> str:
    """What of the records reaches a sample besides the token ids: id, category, prompt, system prompt."""
    return sha256_json([[r.id, r.category, r.prompt, r.system] for r in records])


def gen_key(model_hash: str, records, contexts: list[list[int]], forced: list[list[int]], gen, device: str,
            batch: int) -> dict:
    """Everything the replies depend on (``gen``: an ``evals.generation.GenConfig``; ``batch``: the
    batch size used, which matters only when sampling)."""
    import torch
    import transformers

    return {"schema": SCHEMA, "model_hash": model_hash, "records_sha256": records_sha256(records),
            "inputs_sha256": sha256_json([contexts, forced]), "prompts": len(records),
            "attack": "prefill" if gen.prefill else "none", "prefill": gen.prefill,
            "max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
            "top_p": gen.top_p if not gen.greedy else None, "n": gen.n, "seed": gen.seed, "format": gen.format,
            "backend": gen.backend, "device": str(device).split(":")[0], "batch": None if gen.greedy else batch,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def judge_identity(judge) -> dict | None:
    """What a judge's verdicts depend on (its ``identity()``), or None: not cached."""
    ident = getattr(judge, "identity", None)
    return ident() if callable(ident) else None


# ---------------------------------------------------------------- files


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path):
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check_samples(doc, key: dict, records, n: int) -> str | None:
    """None when ``doc`` is a complete samples entry for ``key`` and ``records``, else why not."""
    if not isinstance(doc, dict) or doc.get("key") != key:
        return "computed for other inputs"
    samples = doc.get("samples")
    if not isinstance(samples, list) or len(samples) != len(records) * n:
        return f"{len(samples) if isinstance(samples, list) else 'no'} samples for {len(records) * n}"
    fields = ("response", "continuation") if key["prefill"] else ("response",)
    for i, s in enumerate(samples):
        r = records[i // n]
        if not isinstance(s, dict) or s.get("prompt") != r.prompt or s.get("id") != r.id:
            return f"sample {i} is not a reply to its prompt"
        if any(not isinstance(s.get(f), str) for f in fields):
            return f"sample {i} has no text"
    return None


def check_verdicts(doc, key: dict, samples: list[dict]) -> str | None:
    """None when ``doc`` holds one verdict per sample and view (null where a sample has no such text)."""
    from .harm import VIEWS

    if not isinstance(doc, dict) or doc.get("key") != key:
        return "computed for other inputs"
    verdicts = doc.get("verdicts")
    if not isinstance(verdicts, dict) or set(verdicts) != set(key["views"]):
        return "views missing"
    for view, vs in verdicts.items():
        if not isinstance(vs, list) or len(vs) != len(samples):
            return f"{view}: {len(vs) if isinstance(vs, list) else 'no'} verdicts for {len(samples)} samples"
        for s, v in zip(samples, vs):
            has_text = isinstance(s.get(VIEWS[view]), str)
            if (v is None) == has_text or (v is not None and (not isinstance(v, dict) or set(v) != set(VERDICT_FIELDS))):
                return f"{view}: a verdict does not match its sample"
    return None


def _notice(path: Path, why: str, what: str) -> None:
    print(f"harmprune: warning: cached {what} {path} are broken ({why}); recomputing", file=sys.stderr)


# ---------------------------------------------------------------- the cache


class GenCache:
    """Judged generations under ``root`` (one directory per model name)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits: list[str] = []  # entries re-used by this process, for tests and notes

    def bind(self, model_hash: str, model_name: str) -> "BoundCache":
        """The cache of one (effective) model: ``model_hash`` from :func:`effective_hash`."""
        return BoundCache(self, model_hash, model_name)


class BoundCache:
    def __init__(self, cache: GenCache, model_hash: str, model_name: str):
        self.cache, self.model_hash, self.model_name = cache, model_hash, model_name

    def entry(self, label: str, key: dict) -> Path:
        safe = label.replace("/", "_").replace(":", "-")
        return self.cache.root / self.model_name.replace("/", "_") / f"{safe}-{sha256_json(key)[:16]}"

    def samples(self, model, tok, records, gen, label: str) -> tuple[list[dict], dict]:
        """(the replies of ``generate_samples(model, tok, records, gen)``, from the cache when a valid
        entry exists, else generated and stored; the entry's key)."""
        from .backends import batch_size_for
        from .generation import build_inputs
        from .harm import generate_samples
        from ..core.formatting import resolve_format

        refs = [r.response for r in records] if gen.prefill else None
        systems = [r.system for r in records] if any(r.system for r in records) else None
        contexts, forced = build_inputs(tok, [r.prompt for r in records], resolve_format(tok, gen.format), refs,
                                        gen.prefill, systems)
        device = getattr(model, "device", "cpu")
        key = gen_key(self.model_hash, records, contexts, forced, gen, device, batch_size_for(gen, device))
        path = self.entry(label, key) / SAMPLES_FILE
        if path.exists():
            doc, why = _read(path)
            why = why or check_samples(doc, key, records, gen.n)
            if why is None:
                self.cache.hits.append(str(path))
                print(f"harmprune: re-using {len(doc['samples'])} replies {path.parent}", file=sys.stderr)
                return doc["samples"], key
            _notice(path, why, "replies")
        samples = generate_samples(model, tok, records, gen)
        write_json_atomic(path, {"key": key, "samples": samples})
        return samples, key

    def judge(self, samples: list[dict], key: dict, label: str, judges: list, judge_fn, views) -> None:
        """Fill the verdicts of ``judges`` into ``samples`` (``evals.harm.judge_samples``'s layout):
        cached verdicts where a valid file exists, the others judged by ``judge_fn(samples, judges,
        views)`` and stored (judges without an identity are judged and not stored)."""
        from .harm import VIEWS, verdict_key

        views = [v for v in views if any(isinstance(s.get(VIEWS[v]), str) for s in samples)]
        gen_sha, todo = sha256_json(key), []
        for j in judges:
            ident = judge_identity(j)
            if ident is None:
                todo.append((j, None, None))
                continue
            vkey = {"generation": gen_sha, "judge": ident, "views": views}
            path = self.entry(label, key) / f"verdicts-{sha256_json(vkey)[:12]}.json"
            if path.exists():
                doc, why = _read(path)
                why = why or check_verdicts(doc, vkey, samples)
                if why is None:
                    self.cache.hits.append(str(path))
                    for view, vs in doc["verdicts"].items():
                        for s, v in zip(samples, vs):
                            if v is not None:
                                s.setdefault(verdict_key(view), {})[j.name] = v
                    continue
                _notice(path, why, f"{j.name} verdicts")
            todo.append((j, vkey, path))
        if todo:
            judge_fn(samples, [j for j, _, _ in todo], views)
        for j, vkey, path in todo:
            verdicts = {v: [s[verdict_key(v)][j.name] if verdict_key(v) in s and j.name in s[verdict_key(v)]
                            else None for s in samples] for v in views}
            # a failed verdict (a judge error) is never stored: the next run tries that judge again
            if path is not None and not any(x and x.get("error") is not None for vs in verdicts.values() for x in vs):
                write_json_atomic(path, {"key": vkey, "verdicts": verdicts})
        names = [j.name for j in judges]
        for s in samples:  # the judges' order, as judge_samples alone would give it
            for v in views:
                if verdict_key(v) in s:
                    d = s[verdict_key(v)]
                    s[verdict_key(v)] = {n: d[n] for n in names if n in d} | d


def cache_dir(option: str | None, scores_dir: str | None = None) -> Path | None:
    """The directory of ``--gen-cache-dir``: None for ``off`` (or empty), ``gencache`` beside
    ``--scores-dir`` for ``auto``, else the path given."""
    if not option or option == "off":
        return None
    if option == "auto":
        return Path(scores_dir or "scores").expanduser().resolve().parent / "gencache"
    return Path(option).expanduser()


__all__ = ["GenCache", "BoundCache", "gen_key", "effective_hash", "mask_digest", "judge_identity", "cache_dir"]
