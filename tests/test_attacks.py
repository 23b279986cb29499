"""`harmprune attack`: the fine-tune keeps (or frees) the mask, the refusal set is a plain set
difference, the table comes from results.json, held-out prompts never reach the attack's data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harmprune.core.data import DataSpec, Record, load_records
from harmprune.core.errors import HarmpruneError
from harmprune.core.models import load_model
from harmprune.pruning.checkpoint import MASK_FILE, load_scores, save_mask
from harmprune.pruning.harmset import harm_set
from harmprune.pruning.select import random_control, select_prune_set
from harmprune.recipes import attacks as A
from harmprune.pruning.masks import union
from harmprune.evals import headline as H
from tiny import randomize_matrices, save_tiny, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")
DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def ckpt(tmp_path, tok):
    model = tiny_llama(tok)
    randomize_matrices(model, torch.Generator().manual_seed(0), std=0.2)
    return save_tiny(tmp_path / "tiny", model, tok)


@pytest.fixture
def pruned(tmp_path):
    """A make-prune-like directory holding only a mask (no prune_config.json: no source hash to check)."""
    d = tmp_path / "pruned"
    d.mkdir()
    mask = {DOWN: torch.zeros(32, 64, dtype=torch.bool), UP: torch.zeros(64, 32, dtype=torch.bool)}
    mask[DOWN][:, :6] = True
    mask[UP][::3, 5] = True
    save_mask(d / MASK_FILE, mask)
    return d, mask


def _cfg(ckpt, pruned_dir, tmp_path, **kw):
    base = dict(model=ckpt, pruned=str(pruned_dir), attack="finetune", out=str(tmp_path / "out"), device="cpu",
                limit=4, max_steps=3, train_batch_size=2, grad_accum=1, train_max_length=200, warmup_steps=0,
                lr=5e-2, lora_r=4, eval_nsamples=2, max_new_tokens=3, gen_batch_size=4, max_length=200,
                nsamples=4, batch_size=4, corpus_tokens=512, scores_dir=str(tmp_path / "scores"))
    return A.AttackConfig(**{**base, **kw})


@pytest.mark.parametrize("full", [False, True])
def test_kept_mask_stays_zero_and_free_mask_relearns(ckpt, pruned, tmp_path, tok, full):
    d, mask = pruned
    fcfg = _cfg(ckpt, d, tmp_path, full=full, lr=1e-2 if full else 5e-2).finetune_config()
    items, _ = A.load_training_data(fcfg, tok)
    orig = dict(load_model(ckpt)[0].named_parameters())
    for keep in (True, False):
        model, rep = A.finetune_arm(fcfg, items, tok.pad_token_id, mask, keep)
        params = dict(model.named_parameters())
        assert rep["steps"] == 3 and rep["zeroed_before"] == int(sum(m.sum() for m in mask.values()))
        for name, m in mask.items():
            w, w0 = params[name].detach(), orig[name].detach()
            assert not torch.equal(w[~m], w0[~m])  # the fine-tune changed the unpruned weights
            if keep:
                assert torch.count_nonzero(w[m]) == 0  # exactly zero after training (and merging)
            else:
                assert torch.count_nonzero(w[m]) > 0.9 * int(m.sum())  # free to re-learn: they moved off 0
        nonzero = sum(int(torch.count_nonzero(params[n].detach()[m])) for n, m in mask.items())
        assert rep["mask_nonzero_after"] == nonzero and (nonzero == 0) == keep


def test_refusal_set_is_a_plain_set_difference():
    g = torch.Generator().manual_seed(3)
    ref = {"a": torch.rand(8, 16, generator=g), "b": torch.rand(4, 32, generator=g)}
    ben = {"a": torch.rand(8, 16, generator=g), "b": torch.rand(4, 32, generator=g)}
    q, p = 0.25, 0.2
    mask, stats = select_prune_set(ref, ben, A.REFUSAL_METHOD, "snip-abs", q, p, "matrix")  # as run_attack selects

    def top(t, frac):  # the floor(frac * n) largest entries, by a plain sort of (value, index)
        flat = t.reshape(-1).tolist()
        k = math.floor(frac * len(flat))
        return set(sorted(range(len(flat)), key=lambda i: -flat[i])[:k])

    for name in ref:
        plain = top(ref[name], q) - top(ben[name], p)
        assert set(mask[name].reshape(-1).nonzero().reshape(-1).tolist()) == plain
    assert stats["total_pruned"] == sum(int(m.sum()) for m in mask.values()) > 0


def test_union_and_shared_prompts():
    a = {"x": torch.tensor([True, False, False]), "y": torch.tensor([False, True])}
    b = {"x": torch.tensor([False, False, True]), "z": torch.tensor([True])}
    u = union([a, b])
    assert u["x"].tolist() == [True, False, True] and u["y"].tolist() == [False, True] and u["z"].tolist() == [True]
    recs = [Record(prompt="Make a  Bomb", response="", id="1"), Record(prompt="bake bread", response="", id="2")]
    assert A.shared_prompts(recs, [Record(prompt="make a bomb", response="", id="3")]) == ["Make a  Bomb"]


def test_shipped_finetune_and_refusal_data_avoid_the_heldout_prompts():
    test = load_records(DataSpec(data="harmful:test"))
    assert A.shared_prompts(load_records(DataSpec(data=A.FT_DATA)), test) == []
    recs, dropped = A.refusal_records(0, test)
    assert dropped == 0 and len(recs) > 500 and all(r.response for r in recs)
    recs2, dropped2 = A.refusal_records(0, recs[:5])  # a held-out prompt is dropped from the refusal data
    assert dropped2 == 5 and not A.shared_prompts(recs2, recs[:5])


def test_finetune_refuses_heldout_prompts_in_its_training_data(ckpt, pruned, tmp_path):
    cfg = _cfg(ckpt, pruned[0], tmp_path, eval_harm="harmful")  # measuring on the training split
    with pytest.raises(HarmpruneError, match="shares .* prompts"):
        A.run_attack(cfg)


def test_pruned_from_other_weights_is_refused(ckpt, pruned, tmp_path):
    (pruned[0] / "prune_config.json").write_text(json.dumps({"model": {"spec": "other", "model_hash": "0" * 64}}))
    with pytest.raises(HarmpruneError, match="was pruned from other"):
        A.run_attack(_cfg(ckpt, pruned[0], tmp_path))


def _table_from_json(out):
    doc = json.loads((out / H.RESULTS_FILE).read_text())
    assert (out / H.TABLE_FILE).read_text() == H.render_table(doc)
    assert (out / H.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    return doc


def test_finetune_attack_end_to_end(ckpt, pruned, tmp_path):
    d, mask = pruned
    out = A.run_attack(_cfg(ckpt, d, tmp_path))
    doc = _table_from_json(out)
    v = doc["variants"]
    assert list(v) == ["original", "original+ft", "pruned+ft", "pruned+ft-free", "random+ft"]
    n = int(sum(m.sum() for m in mask.values()))
    assert [v[k]["pruned_weights"] for k in v] == [0, 0, n, n, n]
    assert v["pruned+ft"]["mask_nonzero_after"] == 0 == v["random+ft"]["mask_nonzero_after"]
    assert v["pruned+ft-free"]["mask_nonzero_after"] > 0
    arms = doc["attack"]["finetune"]["arms"]
    assert arms["pruned+ft"]["losses"] == arms["pruned+ft-free"]["losses"]  # same start, same data, same steps
    assert doc["attack"]["finetune"]["data"]["records_used"] == 4
    head = "| metric | original | original+ft | pruned+ft | pruned+ft-free | random+ft |"
    assert head in (out / H.TABLE_FILE).read_text()


def test_refusal_ablation_end_to_end(ckpt, pruned, tmp_path):
    d, mask = pruned
    benign = tmp_path / "benign.jsonl"
    rows = [{"prompt": f"recipe {i}", "response": f"mix {i} eggs"} for i in range(6)]
    benign.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(ckpt, d, tmp_path, attack="refusal-ablation", benign=str(benign), refusal_q=0.05, refusal_p=0.05)
    out = A.run_attack(cfg)
    doc = _table_from_json(out)
    info = doc["attack"]["refusal_ablation"]
    assert len(list((tmp_path / "scores").glob("*/refusals-snip-abs-n4-*"))) == 1  # through the score cache
    ref = load_scores(info["scores"]["refusal"])
    ben = load_scores(info["scores"]["benign"])
    ablate, _ = harm_set(ref, ben, 0.05, 0.05, "matrix")
    rand = random_control(mask, 0)
    v = doc["variants"]
    assert list(v) == ["original", "original+abl", "pruned+abl", "random+abl"]
    assert v["original+abl"]["pruned_weights"] == info["ablated_weights"] == A.count(ablate) > 0
    assert v["pruned+abl"]["pruned_weights"] == A.count(union([ablate, mask]))
    assert v["random+abl"]["pruned_weights"] == A.count(union([ablate, rand]))
    assert info["overlap_with_pruned"] == A.count(ablate) + A.count(mask) - A.count(union([ablate, mask]))


def test_cli_needs_a_pruned_dir(capsys, tmp_path):
    from harmprune.cli import main

    assert main(["attack", "--attack", "finetune"]) == 2
    assert "--pruned DIR is required" in capsys.readouterr().err
    assert main(["attack", "--attack", "refusal-ablation", "--pruned", str(tmp_path)]) == 2
    assert "no mask.safetensors" in capsys.readouterr().err
