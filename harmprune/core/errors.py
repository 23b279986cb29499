"""One exception type for every user-facing failure: the CLI prints it as a single line."""


class HarmpruneError(Exception):
    """A problem with the user's input or environment; the message is one line that says what to fix."""


class DataError(HarmpruneError):
    """Bad dataset input: the message names the file, row and field."""


class MissingDependency(HarmpruneError):
    """An optional package is needed: the message names what to install."""


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional module or raise MissingDependency naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = f"harmprune[{extra}]" if extra else module
        why = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{module} is needed{why}: pip install '{pkg}'") from None
