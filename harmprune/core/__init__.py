"""Shared layer for every stage: errors, settings, model and data loading, run manifests."""
