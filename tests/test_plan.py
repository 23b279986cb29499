"""`harmprune plan`: counts from the config alone match the real model; estimates move as they must."""

import dataclasses
import json
import math

import pytest
from torch import nn

from harmprune.cli import main
from harmprune.core.errors import HarmpruneError
from harmprune.recipes.plan import (PlanConfig, activation_bytes, estimate_all, estimate_finetune, estimate_generate,
                            estimate_prune, estimate_score, load_shape, logit_bytes, score_file_bytes)
from tiny import save_tiny, tiny_llama, tiny_qwen2


def _decoder_linears(model):
    # brute force: every nn.Linear whose name has a ".<digit>." (decoder blocks), lm_head excluded
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(p.isdigit() for p in n.split("."))}


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama-tied", "qwen2-untied-bias"])
def test_meta_counts_equal_the_real_model(tmp_path, tok, make):
    model = make(tok)
    path = save_tiny(tmp_path / "m", model, tok)
    s = load_shape(path)
    unique = {id(p): p for p in model.parameters()}
    assert s.params == sum(p.numel() for p in unique.values())
    lin = _decoder_linears(model)
    assert s.n_scored == len(lin) == 14
    assert s.scored == sum(m.weight.numel() for m in lin.values())
    assert s.scored_in == sum(m.in_features for m in lin.values())
    assert s.scored_io == sum(m.in_features + m.out_features for m in lin.values())
    assert s.scratch == sum(math.prod(shape) for shape in {tuple(m.weight.shape) for m in lin.values()})
    assert (s.layers, s.hidden, s.vocab) == (2, 32, len(tok))
    assert s.kv_heads == model.config.num_key_value_heads


def test_targets_narrow_the_scored_set(tiny_ckpt):
    s = load_shape(tiny_ckpt, targets=["*.mlp.*"])
    assert s.n_scored == 6 and s.scored == 6 * 32 * 64


@pytest.fixture
def shape(tiny_ckpt):
    return load_shape(tiny_ckpt)


def _cfg(**kw):
    return PlanConfig(model="x", **kw)


def test_doubling_the_batch_doubles_activation_and_logit_terms(shape):
    one = estimate_score(shape, _cfg(batch_size=2), "snip").parts
    two = estimate_score(shape, _cfg(batch_size=4), "snip").parts
    assert two["activations"] == 2 * one["activations"] and two["logits"] == 2 * one["logits"]
    for k in ("weights", "accumulators", "baseline", "load"):
        assert two[k] == one[k]
    # hand-computed: 4 samples x 256 tokens x vocab x 3 float32 copies (float32 model)
    assert two["logits"] == 4 * 256 * shape.vocab * 4 * 3


def test_snip_abs_needs_more_than_snip_and_wanda_less(shape):
    cfg = _cfg()
    snip, abs_, wanda = (estimate_score(shape, cfg, m) for m in ("snip", "snip-abs", "wanda"))
    assert abs_.peak > snip.peak > wanda.peak
    assert abs_.parts["scratch"] == 4 * shape.scratch and snip.parts["scratch"] == 0
    assert snip.parts["accumulators"] == 4 * shape.scored and wanda.parts["accumulators"] == 4 * shape.scored_in
    assert wanda.parts["logits"] == 0


def test_score_dtype_bf16_halves_score_files_and_prune_inputs(shape):
    assert score_file_bytes(shape, "bfloat16") * 2 == score_file_bytes(shape, "float32")
    p32 = estimate_prune(shape, _cfg()).parts["scores"]
    p16 = estimate_prune(shape, _cfg(score_dtype="bfloat16")).parts["scores"]
    assert p16 * 2 == p32 == 2 * 4 * shape.largest  # one matrix of harm + benign at a time (lazy files)


def test_bf16_model_halves_weights_but_not_accumulators(shape):
    f32 = estimate_score(shape, _cfg(), "snip").parts
    b16 = estimate_score(shape, _cfg(dtype="bfloat16"), "snip").parts
    assert b16["weights"] * 2 == f32["weights"] and b16["accumulators"] == f32["accumulators"]


def test_checkpointing_keeps_less_and_recomputes(shape):
    big = dataclasses.replace(shape, layers=32)
    plain = estimate_score(big, _cfg(nsamples=10), "snip")
    ckpt = estimate_score(big, _cfg(nsamples=10, gradient_checkpointing=True), "snip")
    assert ckpt.parts["activations"] < plain.parts["activations"]
    assert plain.passes == {"forward": 3, "backward": 3} and ckpt.passes == {"forward": 6, "backward": 3}
    assert estimate_score(big, _cfg(nsamples=10), "wanda").passes == {"forward": 3, "backward": 0}


def test_eager_attention_adds_a_quadratic_term(shape):
    eager = dataclasses.replace(shape, eager_attention=True)
    a1, a2 = (activation_bytes(eager, 1, L, "float32") - activation_bytes(shape, 1, L, "float32") for L in (64, 128))
    assert a1 > 0 and a2 == 4 * a1


def test_other_stages(shape):
    cfg = _cfg(nsamples=20, gen_batch_size=8, max_new_tokens=10, train_batch_size=2, grad_accum=4)
    gen = estimate_generate(shape, cfg)
    assert gen.passes["forward"] == 3 * 10
    assert gen.parts["kv_cache"] == 2 * shape.layers * shape.kv_heads * shape.head_dim * 8 * (128 + 10) * 4
    lora, full = estimate_finetune(shape, cfg, False), estimate_finetune(shape, cfg, True)
    assert full.parts["grads+adam"] == shape.params * 12 and lora.parts["grads+adam"] == 32 * shape.scored_io * 16
    assert lora.passes == {"forward": 10, "backward": 10, "optimizer_steps": 3}
    assert [s.stage for s in estimate_all(shape, cfg)] == ["score snip", "score snip-abs", "score wanda", "prune",
                                                         "eval/generate", "finetune lora", "finetune full"]
    assert logit_bytes(shape, 1, 1, "bfloat16") == shape.vocab * (12 + 2)


def test_peak_is_baseline_plus_the_larger_of_load_and_run(shape):
    st = estimate_prune(shape, _cfg())
    run = sum(v for k, v in st.parts.items() if k not in ("baseline", "load"))
    assert st.peak == st.parts["baseline"] + max(run, st.parts["load"])
    assert estimate_prune(shape, _cfg(device="cuda")).parts["baseline"] == 0


def test_cli_table_and_json(tiny_ckpt, capsys):
    assert main(["plan", "--model", tiny_ckpt, "--method", "snip", "wanda"]) == 0
    out = capsys.readouterr().out
    assert "peak GiB" in out and "score snip " in out and "finetune full" in out and "score snip-abs" not in out
    assert main(["plan", "--model", tiny_ckpt, "--json", "--nsamples", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    score = next(s for s in data["stages"] if s["stage"] == "score snip")
    assert score["passes"] == {"forward": 2, "backward": 2} and score["peak_bytes"] > 0
    assert data["model"]["params"] == load_shape(tiny_ckpt).params


def test_bad_model_specs(tmp_path, capsys):
    with pytest.raises(HarmpruneError):
        load_shape("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarmpruneError, match="no config.json"):
        load_shape(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "not-an-architecture"}))
    with pytest.raises(HarmpruneError, match="cannot read the config"):
        load_shape(str(bad))
    assert main(["plan", "--model", str(bad)]) == 2
    assert "harmprune: error:" in capsys.readouterr().err
    with pytest.raises(HarmpruneError):
        PlanConfig(model="x", methods=["bogus"])
