"""Smoke test of the main job on the embedded SmolLM2-135M-Instruct (a real GGUF-converted model).

Kept short (a few samples, 64 tokens) so it runs in CI; the first run converts the GGUF (~25 s).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from harmprune.pruning.checkpoint import load_mask
from harmprune.recipes.pipeline import PipelineConfig, run_pipeline

pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    cfg = PipelineConfig(nsamples=4, max_length=64, batch_size=4, eval_nsamples=4, q=1e-4, p=1e-2,
                         scores_dir=str(tmp / "scores"), out=str(tmp / "pruned"))
    return run_pipeline(cfg)


def test_real_pipeline_checkpoint(pruned):
    cfg = json.loads((pruned / "prune_config.json").read_text())
    mask = load_mask(pruned)  # compact (flat indices) on disk, bool masks in memory
    n = sum(int(m.sum()) for m in mask.values())
    assert n == cfg["before_after"]["rows"]["pruned"]["pruned"] > 0
    model = AutoModelForCausalLM.from_pretrained(pruned)
    params = dict(model.named_parameters())
    for k, m in mask.items():
        assert torch.all(params[k][m.bool()] == 0), k
    # the tied head survives the round trip
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_real_table_has_controls(pruned):
    rows = json.loads((pruned / "prune_config.json").read_text())["before_after"]["rows"]
    assert set(rows) == {"original", "pruned", "random"}
    assert rows["random"]["pruned"] == rows["pruned"]["pruned"]
    assert all(r["harmful_nll"] > 0 and r["benign_nll"] > 0 for r in rows.values())
