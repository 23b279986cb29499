"""Recipes: commands that chain library stages (score → prune → measure → fine-tune).

The layer rule (docs/design.md): library packages (core, attribution, pruning, evals, finetune,
subspace) never import anything from here; a recipe may import any library package.
"""
