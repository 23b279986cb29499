"""``harmprune prune`` and ``harmprune apply-mask``: thin shells over the typed stage functions."""

from __future__ import annotations

from ..core.settings import add_arguments, from_namespace
from .prune import ApplyMaskConfig, PruneConfig, apply_mask_stage, prune


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune Top_q(harm) minus Top_p(benign) and save a checkpoint",
                              description="Prune Top_q(I_harm) minus Top_p(I_benign) (or a same-size control) and save a loadable checkpoint.")
    add_arguments(p, PruneConfig)
    p.set_defaults(func=lambda ns: prune(from_namespace(PruneConfig, ns)))
    a = subparsers.add_parser("apply-mask", help="re-apply a saved mask to a checkpoint of the same architecture",
                              description="Zero a saved mask in another checkpoint of the same architecture (e.g. after fine-tuning).")
    add_arguments(a, ApplyMaskConfig)
    a.set_defaults(func=lambda ns: apply_mask_stage(from_namespace(ApplyMaskConfig, ns)))
    from .pipeline import PipelineConfig, run_pipeline
    from .sweep import SweepConfig, run_sweep

    r = subparsers.add_parser("pipeline", help="score (cached), prune and print the before/after NLL table (make prune)",
                              description="Score harmful and benign data (cached), prune the harm-specific set, "
                                          "save the checkpoint and compare held-out NLL with a random control.")
    add_arguments(r, PipelineConfig)
    r.set_defaults(func=lambda ns: run_pipeline(from_namespace(PipelineConfig, ns)))
    s = subparsers.add_parser("sweep", help="the before/after table over a (q, p) grid with controls (make sweep)",
                              description="Measure harmful and benign NLL increases over a (q, p) grid for the "
                                          "harm-specific set and same-size random/magnitude controls; CSV + PNG.")
    add_arguments(s, SweepConfig)
    s.set_defaults(func=lambda ns: run_sweep(from_namespace(SweepConfig, ns)))
