"""Safety-subspace commands (Ponkshe et al. 2026) over checkpoints streamed one tensor at a time.

- ``subspace project`` (:mod:`.project`): the aligned model plus the parallel or orthogonal part of a
  fine-tune's update, as a loadable checkpoint with the energy kept.
- ``subspace overlap`` (:mod:`.overlap`): MSO of weight updates per layer and module type.
- ``subspace activations`` (:mod:`.activations`): MSO of last-prompt-token hidden states of prompt sets.
- ``make subspaces`` (:mod:`.study`): the whole study, next to B-TAP's harm-specific set.

The math is in the library package ``harmprune.subspace``.
"""
