"""The ``harmprune`` command: a thin shell over one typed function per stage.

Each stage package has a ``cli`` module with ``register(subparsers)``; it adds its sub-command(s)
and sets ``func`` to a callable taking the parsed namespace. Errors that are the user's to fix
(HarmpruneError) end as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core.errors import HarmpruneError

COMMAND_MODULES = (
    "harmprune.attribution.cli",
    "harmprune.pruning.cli",
    "harmprune.evals.cli",
    "harmprune.finetune.cli",
    "harmprune.ablation.cli",
    "harmprune.evals.em_experiment",
    "harmprune.plan",
)


def present_modules(names):
    """Import each named plug-in module, skipping one that does not exist (its command is absent).

    An ImportError raised *inside* an existing module is not swallowed.
    """
    for name in names:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmprune", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"harmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in present_modules(COMMAND_MODULES):
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except HarmpruneError as e:
        print(f"harmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harmprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
