"""Eval tasks behind one small protocol, with a registry (house style: lm-eval's tasks, our judges).

A task reads and checks its inputs in ``prepare`` (before any model is loaded: bad input costs
nothing) and measures in ``run``, which gets a ``load()`` callable for the model so that a task
that needs none (``eval harm --resume``) never loads it. :func:`run_eval` is the one runner: out
dir check, banner, results.json, samples.jsonl, report.md and the printed table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..core import manifest
from ..core.settings import to_dict
from . import results as R
from .base import load_eval_model, short_hash


@dataclass
class Prepared:
    """What a task read and checked before any model is loaded."""

    data: dict  # data fingerprints for results.json
    state: Any = None  # the task's own inputs (records, judges, ...)
    gen: Any = None  # generation settings as they will be used (backend resolved), or None


@dataclass
class Outcome:
    """What a task measured."""

    results: dict  # {task: {metric: value, metric_stderr: se}}
    samples: list[dict]
    model: dict  # the evaluated model's info (spec, hash, ...)
    notes: list[str] = field(default_factory=list)
    body: str = ""  # report.md after the header (tables)
    extra: dict = field(default_factory=dict)  # more top-level sections of results.json
    table_depth: int = 1  # result keys with at most this many "/" are printed


class EvalTask(Protocol):
    name: str  # "harm" -> ``harmprune eval harm``
    title: str

    def prepare(self, cfg, gen) -> Prepared: ...

    def run(self, load: Callable, cfg, prep: Prepared) -> Outcome: ...


TASKS: dict[str, EvalTask] = {}


def register_task(task):
    """Register a task (a class is instantiated once; usable as a class decorator)."""
    obj = task() if isinstance(task, type) else task
    TASKS[obj.name] = obj
    return task


def report(title: str, model: dict, data: dict, notes: list[str], body: str) -> str:
    lines = [f"# {title}", "", f"- model: `{model.get('spec')}` (hash {short_hash(model)})"]
    sets = {"data": data} if "spec" in data else data  # one dataset's fingerprint, or {name: fingerprint}
    lines += [f"- {name}: `{d['spec']['data'] if isinstance(d.get('spec'), dict) else d.get('spec')}`"
              + (f": {d['selected']} of {d['rows']} rows" if "selected" in d and "rows" in d else "")
              for name, d in sets.items() if isinstance(d, dict) and "spec" in d]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n\n" + body


def run_eval(task: EvalTask, cfg, gen=None, overwrite_own: bool = False) -> Path:
    """Run one eval task end to end; returns the run directory (see the module docstring).

    ``overwrite_own``: the task left an unfinished run of its own in ``--out`` (``eval harm``'s
    saved replies), which the finished run replaces.
    """
    t0 = time.perf_counter()
    # the settings as given (prepare may fill some in): what `harmprune eval TASK --config` replays
    replay = manifest.config_text(f"eval {task.name}", cfg, *([gen] if gen is not None else []))
    if not overwrite_own:
        manifest.check_out_dir(cfg.out, cfg.overwrite)
    prep = task.prepare(cfg, gen)
    gen = prep.gen if prep.gen is not None else gen
    config = {**to_dict(cfg), **({"generation": to_dict(gen)} if gen is not None else {})}
    manifest.banner(f"eval {task.name}", {**to_dict(cfg), **(to_dict(gen) if gen is not None else {})})
    backend = getattr(gen, "backend", "hf")
    out = task.run(lambda: load_eval_model(cfg, backend), cfg, prep)
    doc = R.results_doc(config, out.results, model=out.model, data=prep.data, notes=out.notes,
                        wall_seconds=round(time.perf_counter() - t0, 3), **out.extra)
    text = report(f"harmprune eval {task.name}: {task.title}", out.model, prep.data, out.notes, out.body)
    path = R.write_run(cfg.out, doc, out.samples, text, overwrite=cfg.overwrite or overwrite_own,
                       extra_files={manifest.CONFIG_YAML: replay})
    print(R.results_table({k: v for k, v in out.results.items() if k.count("/") <= out.table_depth}))
    return path
