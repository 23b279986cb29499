"""Ablation studies across harm categories (``harmprune ablate``, ``make ablation``).

Per-category harm-specific sets, their overlap against random sets of the same sizes, the transfer
of pruning one category's set to other categories, compression curves, and where the pruned
weights sit. Pure math lives in ``pruning.masks``, ``distribution`` and ``curves``; ``transfer`` and
``run`` are the shells that touch a model.
"""
