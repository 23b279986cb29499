"""``harmprune eval {harm,utility,recognition,em}``, ``harmprune generate``, ``harmprune compare``.

Each eval task module in ``EVAL_TASKS`` exposes ``register_eval(eval_subparsers)``; a module that
does not exist yet is skipped (its command is simply absent).
"""

from __future__ import annotations

EVAL_TASKS = ("harmprune.evals.harm", "harmprune.evals.utility", "harmprune.evals.recognition", "harmprune.evals.em")


def _no_task(_ns) -> None:
    from ..core.errors import HarmpruneError

    raise HarmpruneError("eval needs a task: harmprune eval {harm,utility,recognition,em} --help")


def register(subparsers) -> None:
    from . import compare, selfgen

    ev = subparsers.add_parser("eval", help="evaluate a model: harm, utility, recognition, em",
                               description="Evaluate a model; every task writes results.json, samples.jsonl "
                                           "and report.md to --out.")
    tasks = ev.add_subparsers(dest="eval_task", metavar="TASK")
    from ..cli import present_modules

    for mod in present_modules(EVAL_TASKS):
        mod.register_eval(tasks)
    ev.set_defaults(func=_no_task)
    selfgen.register(subparsers)
    compare.register(subparsers)
