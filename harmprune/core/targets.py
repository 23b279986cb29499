"""Select the linear layers to score or prune, by module-name pattern; never by architecture. Where a
parameter sits, from its name alone: :func:`layer_index` and :func:`module_type` (the one parser).

Patterns are shell globs (``*.mlp.*``) or regexes prefixed with ``re:`` (``re:.*\\.q_proj$``),
matched against full module names such as ``model.layers.0.self_attn.q_proj``.
Everything downstream is keyed by the full *parameter* name (``<module>.weight``).
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from .errors import HarmpruneError

# The default: linear layers inside repeated blocks (a ".<digits>." in the name), which covers
# decoder layers of Llama, Qwen, Mistral, Gemma, GPT-2-style and MoE models alike, and leaves out
# lm_head, embeddings and any projection outside the stack.
DEFAULT_TARGETS = ["re:.*\\.\\d+\\..*"]
_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The block index of a parameter name, its first ``.<digits>.`` (``model.layers.3.mlp.down_proj.weight``,
    ``transformer.h.3.attn.c_attn.weight``, MoE ``...layers.3.mlp.experts.7.w1.weight`` → 3); else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str, bias_apart: bool = False) -> str:
    """The module's own name, the component before ``.weight``/``.bias`` (``down_proj``, ``c_attn``);
    ``bias_apart``: a bias is a type of its own (``q_proj.bias``), for tables that include biases."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2] + (".bias" if bias_apart and parts[-1] == "bias" else "")
    return parts[-1]


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches one ``--targets``/``--ignore`` pattern (glob, or ``re:`` regex, full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Map each parameter name to the other names sharing its storage (empty when untied)."""
    by_ptr: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        # meta tensors (accelerate-offloaded weights) all have data_ptr 0: only identity ties them
        by_ptr.setdefault(("meta", id(p)) if p.is_meta else p.data_ptr(), []).append(name)
    return {n: [m for m in names if m != n] for names in by_ptr.values() for n in names}


def select_linears(model: nn.Module, targets: list[str] | None = None,
                   ignore: list[str] | None = None) -> dict[str, nn.Linear]:
    """Return ``{module name: nn.Linear}`` for matched linear layers, in model order.

    Raises HarmpruneError when a pattern in ``targets`` matches no linear layer. A tied weight
    (e.g. ``lm_head`` sharing the embedding) is only included if a pattern names it explicitly,
    and then a note says what it is tied to.
    """
    targets = list(targets) if targets else list(DEFAULT_TARGETS)
    ignore = list(ignore or [])
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ties = tied_parameters(model)
    explicit = targets != DEFAULT_TARGETS
    chosen: dict[str, nn.Linear] = {}
    for pat in targets:
        hits = [n for n, _ in linears if matches(n, pat)]
        if not hits:
            raise HarmpruneError(f"--targets pattern {pat!r} matches no linear layer "
                                 f"(e.g. {', '.join(n for n, _ in linears[:3])})")
    for name, mod in linears:
        if not any(matches(name, p) for p in targets) or any(matches(name, p) for p in ignore):
            continue
        tied = ties.get(f"{name}.weight", [])
        if tied:
            if not explicit:
                continue
            import sys

            print(f"harmprune: note: {name}.weight is tied to {', '.join(tied)}; "
                  "scoring or pruning it changes those too", file=sys.stderr)
        chosen[name] = mod
    if not chosen:
        raise HarmpruneError("no linear layer left after --targets/--ignore")
    return chosen
