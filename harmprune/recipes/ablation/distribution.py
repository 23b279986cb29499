"""Where pruned weights sit: per layer and per module type, parsed from parameter names
(``core.targets.layer_index``/``module_type``); names without a layer go to "other" in tables. Pure.
"""

from __future__ import annotations

import torch

from ...core.targets import layer_index, module_type
from ...pruning.masks import count_of


def distribution(mask: dict[str, torch.Tensor]) -> dict:
    """Counts of selected weights per layer and per module type, with fractions of the total
    selected (``share``) and of the weights available there (``density``).

    Returns ``{"total", "by_layer": {layer: {pruned, numel, share, density}}, "by_type": {...}}``;
    layer keys are strings (JSON), ``"other"`` for names without a layer index, sorted numerically.
    """
    by_layer: dict[str, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    total = 0
    for name, m in mask.items():
        c, n = count_of(m), m.numel()
        total += c
        li = layer_index(name)
        for table, key in ((by_layer, "other" if li is None else str(li)), (by_type, module_type(name))):
            row = table.setdefault(key, [0, 0])
            row[0] += c
            row[1] += n

    def rows(table, order):
        return {k: {"pruned": c, "numel": n, "share": c / total if total else 0.0, "density": c / n if n else 0.0}
                for k, (c, n) in sorted(table.items(), key=order)}

    return {"total": total,
            "by_layer": rows(by_layer, lambda kv: (kv[0] == "other", int(kv[0]) if kv[0].isdigit() else 0)),
            "by_type": rows(by_type, lambda kv: kv[0])}
