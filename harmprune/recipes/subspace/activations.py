"""``harmprune subspace activations``: do prompts with different safety implications activate
overlapping subspaces?

For each prompt set, the hidden state of the last prompt token (the position the reply starts
from; batches are LEFT padded with position ids counted over real tokens, so padding changes
nothing) at each chosen layer, stacked n × d. MSO (``harmprune.subspace.overlap``) between every two
sets per layer over the ``--etas`` grid (subspaces of the hidden space R^d), then averaged over
layers. Layers: ``hidden_states[l]`` = output of block l (1..L); default the blocks at 65 %-90 % of
the depth (the nearest block when that range holds none). Prompts are formatted with the model's
chat template (``core.formatting``), as generation sees them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...attribution.score import select
from ...core import manifest
from ...core.data import DataSpec, data_fingerprint, load_records
from ...core.hidden import last_token_states, model_layers
from ...core.models import load_model, model_hash
from ...core.settings import check, opt, to_dict
from ...subspace.overlap import left_factors, mso_curve
from ...core import validate
from ...core.models import resolve_device
from ...core.options import (EtaOptions, ModelOptions, NSamplesOptions, OutputOptions, PassOptions,
                             SeedOptions)
from .overlap import _mean

# Shipped prompt sets by name (harmprune/data/builtin/NOTICE.md); anything else is a data spec.
NAMED_SETS = {
    "harmful": ("harmful:all", {}),  # JailbreakBench behaviours (the B-TAP scoring prompts)
    "harmbench": ("recognition.jsonl", {"category_field": "label", "category": "harmful"}),  # HarmBench + AdvBench
    "xstest": ("xstest_safe.jsonl", {}),  # XSTest safe prompts that sound unsafe
    "benign": ("benign:all", {}),
}


@dataclass(kw_only=True)
class ActivationsConfig(ModelOptions, NSamplesOptions, PassOptions, EtaOptions, SeedOptions, OutputOptions):
    """Settings of ``harmprune subspace activations``: ``--nsamples`` distinct prompts per set (seeded);
    prompts longer than ``--max-length`` keep their last tokens."""

    sets: list[str] = opt(["harmful", "harmbench", "xstest"], help="2 or 3 prompt sets: harmful, harmbench, "
                          "xstest, benign, or data specs (file, hf:<name>, built-in)")
    layers: list[int] = opt([], help="blocks to read (1..L); none = those at --depth-from..--depth-to of the depth", range=">= 1")
    depth_from: float = opt(0.65, help="first block as a fraction of the depth", range="[0, 1]")
    depth_to: float = opt(0.9, help="last block as a fraction of the depth", range="[0, 1]")

    def __post_init__(self):
        self.device = resolve_device(self.device)  # SVDs and tensors go straight to it
        validate.check_device(self.device)
        check(bool(self.out), "--out is required")
        check(2 <= len(self.sets) <= 3, "--sets takes 2 or 3 prompt sets")
        check(len(set(self.sets)) == len(self.sets), "--sets must be distinct")
        check(0 <= self.depth_from <= self.depth_to <= 1, "need 0 <= --depth-from <= --depth-to <= 1")
        check(all(0 < e <= 1 for e in self.eta), "--eta values must be in (0, 1]")
        check(self.nsamples >= 0 and self.batch_size >= 1 and self.max_length >= 2,
              "--nsamples >= 0, --batch-size >= 1, --max-length >= 2")
        check(all(l >= 1 for l in self.layers), "--layers are block numbers from 1")


def prompt_set(name: str, nsamples: int, seed: int) -> tuple[list[str], dict]:
    """Distinct prompts of a named set or data spec (seeded selection) and its fingerprint."""
    from ...data import path as builtin_file

    data, fields = NAMED_SETS.get(name, (name, {}))
    if data.endswith(".jsonl") and not Path(data).exists():
        data = str(builtin_file(data))
    spec = DataSpec(data=data, **fields)
    records = load_records(spec, require_response=False)
    prompts = list(dict.fromkeys(r.prompt for r in records))
    chosen = select(prompts, nsamples, seed)
    return chosen, {**data_fingerprint(spec, records), "name": name, "distinct_prompts": len(prompts),
                    "selected": len(chosen)}


def depth_layers(n_layers: int, lo: float, hi: float) -> list[int]:
    """Blocks l in 1..L with lo <= l / L <= hi; when none, the block nearest the range's middle."""
    chosen = [l for l in range(1, n_layers + 1) if lo - 1e-9 <= l / n_layers <= hi + 1e-9]
    if chosen:
        return chosen
    mid = (lo + hi) / 2 * n_layers
    return [min(range(1, n_layers + 1), key=lambda l: abs(l - mid))]


def activation_overlap(states: dict[str, dict[int, torch.Tensor]], etas: list[float]) -> dict:
    """MSO between every two sets per layer (subspaces of R^d: the transposed n × d stacks), and the
    mean over layers: ``{"per_layer": {pair: {layer: curve}}, "mean": {pair: [{eta, mso, random}]}}``."""
    names = list(states)
    factors = {s: {l: left_factors(h.T) for l, h in states[s].items()} for s in names}
    per_layer, mean = {}, {}
    for a, b in itertools.combinations(names, 2):
        pair = f"{a} vs {b}"
        per_layer[pair] = {l: mso_curve(factors[a][l], factors[b][l], etas) for l in states[a]}
        curves = list(per_layer[pair].values())
        mean[pair] = [{"eta": e, "mso": _mean([c[i]["mso"] for c in curves]),
                       "random": _mean([c[i]["random"] for c in curves]),
                       "k_a": _mean([c[i]["k_a"] for c in curves]), "k_b": _mean([c[i]["k_b"] for c in curves])}
                      for i, e in enumerate(etas)]
    return {"per_layer": per_layer, "mean": mean}


def measure(model, tok, cfg: ActivationsConfig) -> tuple[dict, dict]:
    """(results of one loaded model, prompt-set fingerprints)."""
    n_layers = model_layers(model)
    layers = sorted(set(cfg.layers)) or depth_layers(n_layers, cfg.depth_from, cfg.depth_to)
    check(all(l <= n_layers for l in layers), f"--layers must be at most {n_layers} (the model's depth)")
    states, data = {}, {}
    for name in cfg.sets:
        prompts, data[name] = prompt_set(name, cfg.nsamples, cfg.seed)
        states[name] = last_token_states(model, tok, prompts, layers, cfg.format, cfg.batch_size, cfg.max_length)
    res = activation_overlap(states, cfg.eta)
    return {"layers": layers, "n_layers": n_layers, "hidden_size": int(states[cfg.sets[0]][layers[0]].shape[1]),
            **res}, data


def run_activations(cfg: ActivationsConfig) -> Path:
    """Write results.json and mso_activations.png; return ``cfg.out``."""
    from . import plots

    t0 = time.perf_counter()
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    manifest.banner("subspace activations", to_dict(cfg))
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    res, data = measure(model, tok, cfg)
    results = {"config": to_dict(cfg), "versions": manifest.versions(),
               "model": {"spec": cfg.model, "model_hash": model_hash(model)}, "data": data, **res}
    with manifest.atomic_dir(cfg.out, cfg.overwrite) as tmp:
        results["figures"] = [plots.mso_figure(res["mean"], tmp / "mso_activations.png",
                                               f"activation MSO, mean over blocks {res['layers']}")]
        results["wall_seconds"] = time.perf_counter() - t0
        manifest.write_json(tmp / "results.json", results)
        manifest.write_config(tmp, "subspace activations", cfg)
    for pair, pts in res["mean"].items():
        mid = pts[len(pts) // 2]
        print(f"harmprune: {pair}: MSO {mid['mso'] if mid['mso'] is None else round(mid['mso'], 3)} at eta "
              f"{mid['eta']:g} (random {mid['random'] if mid['random'] is None else round(mid['random'], 3)})")
    return Path(cfg.out)


