"""Generations are never lost to a failing judge: save them first, judge second, resume on failure.

``eval harm`` writes its replies to ``OUT/samples.jsonl`` with ``OUT/pending.json`` (what produced
them) as soon as generation ends, atomically; only then are the judges called. When judging fails
(an unreachable or refusing endpoint, or more than ``--max-judge-errors`` of the samples failed)
the run ends with one line and the replies stay there; ``--resume`` judges them again, with the
same or other judges, without loading the model or generating. A finished run replaces the
pending directory with the complete one (results.json, samples.jsonl with verdicts, report.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core import manifest
from ..core.errors import HarmpruneError
from . import results as R

PENDING_FILE = "pending.json"
# settings that decide the replies: a resumed run must match them (judges, timeouts, out may change)
GENERATION_KEYS = ("model", "dtype", "adapter", "load_in_8bit", "load_in_4bit", "prompts", "limit", "category",
                   "prompt_field", "response_field", "category_field")


def check_out(out: str | Path, overwrite: bool, resume: bool) -> dict | None:
    """Check ``out`` before anything is loaded; return the pending state to resume, or None."""
    out = Path(out)
    state = out / PENDING_FILE
    if state.is_file() and not (out / R.RESULTS_FILE).is_file():
        if resume:
            try:
                return json.loads(state.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise HarmpruneError(f"{state} is corrupt or cut short; pass --overwrite to generate again") from None
        if not overwrite:
            raise HarmpruneError(f"{out} holds the replies of an unfinished run (judging failed): pass --resume to "
                                 "judge them without generating again, or --overwrite to start over")
    elif resume and (out / R.RESULTS_FILE).is_file() and not overwrite:
        raise HarmpruneError(f"{out} is a finished run: nothing to resume (pass --overwrite to run it again)")
    manifest.check_out_dir(out, overwrite)
    return None


def saved_samples(out: str | Path, state: dict, config: dict, data: dict) -> list[dict]:
    """The saved replies (verdicts dropped), after checking they came from the same settings."""
    for key in GENERATION_KEYS:
        if state["config"].get(key) != config.get(key):
            raise HarmpruneError(f"{out} was generated with {key}={state['config'].get(key)!r}, this run has "
                                 f"{config.get(key)!r}; resume with the same settings or pass --overwrite")
    gen_then = {k: v for k, v in state["config"]["generation"].items() if k != "backend"}
    gen_now = {k: v for k, v in config["generation"].items() if k != "backend"}
    if gen_then != gen_now:
        key = next(k for k in sorted(set(gen_then) | set(gen_now)) if gen_then.get(k) != gen_now.get(k))
        raise HarmpruneError(f"{out} was generated with --{key.replace('_', '-')} {gen_then.get(key)}, this run "
                             f"has {gen_now.get(key)}; resume with the same settings or pass --overwrite")
    if state["data"].get("sha256") != data.get("sha256"):
        raise HarmpruneError(f"{out}: the prompts changed since the replies were generated; pass --overwrite")
    try:
        samples = R.read_samples(out)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise HarmpruneError(f"{Path(out) / R.SAMPLES_FILE} is corrupt or cut short; pass --overwrite") from None
    path = Path(out) / R.SAMPLES_FILE
    for i, s in enumerate(samples, 1):
        bad = [k for k in ("prompt", "response") if not isinstance(s.get(k) if isinstance(s, dict) else None, str)]
        if bad:
            raise HarmpruneError(f"{path} row {i} has no text {bad[0]!r}: the file is damaged; pass --overwrite to "
                                 "generate again")
        s.pop("judges", None)
    selected = (state.get("data") or {}).get("selected")
    n = ((state.get("config") or {}).get("generation") or {}).get("n") or 1
    expected = selected * n if isinstance(selected, int) and isinstance(n, int) else None
    if expected is not None and len(samples) != expected:
        raise HarmpruneError(f"{path} holds {len(samples)} replies but the run generated {expected}: the file is cut "
                             "short or edited; pass --overwrite to generate again")
    return samples


def save(out: str | Path, overwrite: bool, state: dict, samples: list[dict]) -> None:
    """Write the unjudged replies and their state atomically to ``out``."""
    with manifest.atomic_dir(out, overwrite) as tmp:
        manifest.write_json(tmp / PENDING_FILE, R._json_ready({**state, "versions": manifest.versions()}))
        with (tmp / R.SAMPLES_FILE).open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(R._json_ready(s), ensure_ascii=False, default=str) + "\n")


def check_judges(judges: list) -> None:
    """Each judge's own pre-flight check (``check()``, e.g. one request to a remote endpoint)."""
    for j in judges:
        check = getattr(j, "check", None)
        if callable(check):
            check()


def judge_or_stop(samples: list[dict], judges: list, max_errors: float, out: str | Path, judge_samples) -> None:
    """Judge ``samples`` in place with ``judge_samples(samples, judges)``; a judge that raises, or fails
    on more than ``max_errors`` of the samples, ends the run with one line saying where the replies
    are and how to finish."""
    keep = f"the {len(samples)} replies are saved in {out}: re-run with --resume to judge them without generating again"
    try:
        judge_samples(samples, judges)
    except HarmpruneError as e:
        raise HarmpruneError(f"{e}; {keep}") from None
    for j in judges:
        errors = [s["judges"][j.name]["error"] for s in samples if s["judges"][j.name].get("error")]
        if samples and len(errors) > max_errors * len(samples):
            raise HarmpruneError(f"judge {j.name} failed on {len(errors)} of {len(samples)} samples (more than "
                                 f"--max-judge-errors {max_errors:g}), e.g. {' '.join(str(errors[0]).split())}; {keep}")
