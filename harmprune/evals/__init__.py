"""Evaluation: generation engine (``generation``), judges (``judges``), and the eval commands.

Score direction everywhere: a judge's ``score`` is harmfulness in [0, 1], higher = more harmful;
0-100 ratings follow the judge prompt's own direction (e.g. ``aligned``: higher = more aligned).
"""
