"""Scaling options of ``harmprune score`` give the plain single-process scores: data-parallel
processes (gloo, through the CLI), accelerate CPU/disk offload, activation checkpointing, bf16."""

import json

import pytest
import torch
from tiny import make_tokenizer, tiny_llama

from harmprune.attribution import compute_scores
from harmprune.attribution.artifact import load_scores
from harmprune.core.models import model_hash as _model_hash
from harmprune.cli import main
from harmprune.core.data import Record
from harmprune.core.models import model_hash

METHODS = ("snip", "snip-abs", "wanda")
# Lengths differ so that batches carry padding and the two shards get different batch shapes.
ROWS = [{"prompt": f"how to do thing {i}?", "response": f"Sure, here is how {i}: " + "step. " * (i % 4 + 1)}
        for i in range(9)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _pair(s):
    return s.tensors, s.meta


def records():
    return [Record(prompt=r["prompt"], response=r["response"]) for r in ROWS]


def run(*args):
    return main(["score", *map(str, args)])


def assert_same(got, ref, rtol=1e-5):
    """Equal up to float summation order: every matrix within rtol of its own largest entry."""
    assert sorted(got) == sorted(ref)
    for k in ref:
        scale = ref[k].abs().max().item()
        assert scale > 0, k
        err = (got[k].float() - ref[k].float()).abs().max().item()
        assert err <= rtol * scale, f"{k}: max error {err:.3g} vs scale {scale:.3g}"


# -- data parallel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_shards_summed_before_finalize_equal_the_whole_set(method, llama, tok):
    # In one process: rank 1's raw sums are kept and added into rank 0's by the reduce hook, which
    # is what the all-reduce does; this checks sharding and the reduce point of the engine.
    kw = dict(fmt="chat", max_length=64, batch_size=2, progress=False)
    ref, ref_stats = compute_scores(llama, tok, records(), method, **kw)
    kept = {}

    def keep(accs, counts):
        kept.update(accs={k: v.clone() for k, v in accs.items()}, counts=dict(counts))
        return counts

    def add_kept(accs, counts):
        for k, v in accs.items():
            v.add_(kept["accs"][k])
        return {k: counts[k] + kept["counts"][k] for k in counts}

    compute_scores(llama, tok, records(), method, shard=(1, 2), reduce=keep, **kw)
    got, stats = compute_scores(llama, tok, records(), method, shard=(0, 2), reduce=add_kept, **kw)
    assert_same(got, ref)
    assert kept["counts"]["samples"] == 4 and stats["samples"] == ref_stats["samples"] == 9
    assert stats["tokens"] == ref_stats["tokens"] and stats["layers_never_run"] == []
    if method != "wanda":
        assert stats["mean_nll"] == pytest.approx(ref_stats["mean_nll"], rel=1e-6)


def _gloo_worker(ckpt: str, out: str) -> None:
    """One rank of ``distributed.launch``: every method on the 9 records, and on 1 record (rank 1's
    shard is empty then), summed with the all-reduce; rank 0 saves the scores."""
    from safetensors.torch import save_file

    from harmprune.attribution import distributed
    from harmprune.core.models import load_model

    proc = distributed.setup("cpu")
    assert proc.world == 2 and torch.distributed.get_backend() == "gloo"
    model, tok = load_model(ckpt)
    for n in (9, 1):
        for method in METHODS:
            scores, stats = compute_scores(model, tok, records()[:n], method, fmt="chat", max_length=64,
                                           batch_size=2, progress=False, shard=proc.shard,
                                           reduce=distributed.all_reduce_run)
            assert stats["samples"] == n
            if proc.is_main:
                save_file(scores, f"{out}/{method}-{n}.safetensors")


def test_two_gloo_processes_sum_to_the_single_process_scores(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from harmprune.attribution import distributed
    from harmprune.core.models import load_model

    distributed.launch(2, _gloo_worker, tiny_ckpt, str(tmp_path))
    model, tok = load_model(tiny_ckpt)
    for n in (9, 1):
        for method in METHODS:
            ref, _ = compute_scores(model, tok, records()[:n], method, fmt="chat", max_length=64, batch_size=2,
                                    progress=False)
            assert_same(load_file(str(tmp_path / f"{method}-{n}.safetensors")), ref)


def test_cli_num_processes_2_equals_one_process_and_records_world_size(tiny_ckpt, data, tmp_path):
    common = ["--model", tiny_ckpt, "--data", data, "--nsamples", 0, "--batch-size", 2, "--max-length", 64,
              "--method", "snip-abs"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(*common, "--out", one) == 0
    assert run(*common, "--out", two, "--num-processes", 2) == 0
    (ref, meta1), (got, meta2) = _pair(load_scores(one)), _pair(load_scores(two))
    assert_same(got, ref)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert meta1["world_size"] == 1 and meta2["world_size"] == 2 and meta2["config"]["num_processes"] == 2
    assert meta2["nsamples"] == meta1["nsamples"] and meta2["tokens"] == meta1["tokens"]
    assert meta2["layers_never_run"] == [] and meta2["model_hash"] == meta1["model_hash"]
    assert meta2["mean_nll"] == pytest.approx(meta1["mean_nll"], rel=1e-6)
    assert sorted(p.name for p in two.iterdir()) == ["meta.json", "scores.safetensors"]


def test_a_failing_process_stops_the_run_with_one_error(tmp_path):
    from harmprune.attribution import distributed
    from harmprune.core.errors import HarmpruneError

    with pytest.raises(HarmpruneError, match=r"process \d of 2 failed"):
        distributed.launch(2, _failing_worker)


def _failing_worker() -> None:
    from harmprune.attribution import distributed
    from harmprune.core.errors import HarmpruneError

    if distributed.setup("cpu").rank == 1:
        raise HarmpruneError("rank 1 cannot go on")


def test_bad_input_fails_before_processes_start(tiny_ckpt, tmp_path, capsys):
    assert run("--model", tiny_ckpt, "--data", tmp_path / "nope.jsonl", "--method", "snip",
               "--out", tmp_path / "o", "--num-processes", 2) == 2
    assert "nope.jsonl" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert run("--model", tiny_ckpt, "--method", "snip", "--out", tmp_path / "o", "--num-processes", 0) == 2
    assert run("--model", tiny_ckpt, "--method", "snip", "--out", tmp_path / "o", "--num-processes", 2,
               "--device-map", "auto") == 2
    assert run("--model", tiny_ckpt, "--method", "snip", "--out", tmp_path / "o", "--device-map", "{bad") == 2
    assert "--device-map" in capsys.readouterr().err


# -- offload ----------------------------------------------------------------------------------------
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_disk_offloaded_model_scores_like_the_model_on_device(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from harmprune.core.models import load_model

    plain, tok = load_model(tiny_ckpt)
    off = AutoModelForCausalLM.from_pretrained(tiny_ckpt, device_map=DISK_MAP, offload_folder=str(tmp_path / "off"))
    w = off.model.layers[0].mlp.down_proj.weight
    assert w.is_meta  # really offloaded: the weight only exists inside the layer's forward
    for method in METHODS:
        ref, _ = compute_scores(plain, tok, records(), method, fmt="chat", max_length=64, batch_size=2,
                                progress=False)
        got, stats = compute_scores(off, tok, records(), method, fmt="chat", max_length=64, batch_size=2,
                                    progress=False)
        assert_same(got, ref)
        assert stats["layers_never_run"] == []
        got, _ = compute_scores(off, tok, records(), method, fmt="chat", max_length=64, batch_size=2,
                                progress=False, gradient_checkpointing=True)
        assert_same(got, ref)
    assert off.model.layers[0].mlp.down_proj.weight.is_meta  # left offloaded
    assert _model_hash(off) == model_hash(plain)


def test_cli_device_map_json_with_disk_offload(tiny_ckpt, data, tmp_path):
    common = ["--model", tiny_ckpt, "--data", data, "--nsamples", 4, "--method", "snip", "--max-length", 64]
    assert run(*common, "--out", tmp_path / "plain") == 0
    assert run(*common, "--out", tmp_path / "off", "--device-map", json.dumps(DISK_MAP),
               "--offload-folder", tmp_path / "offload") == 0
    (ref, _), (got, meta) = _pair(load_scores(tmp_path / "plain")), _pair(load_scores(tmp_path / "off"))
    assert_same(got, ref)
    assert meta["device_map"]["model.layers.1"] == "disk"


# -- memory options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_counts_each_layer_once_and_scores_the_same(method, tok):
    model = tiny_llama(tok)
    modes = [m.training for m in model.modules()]
    recomputed = []
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_hook(lambda *a: recomputed.append(1))
    kw = dict(fmt="chat", max_length=64, batch_size=4, progress=False)
    ref, _ = compute_scores(model, tok, records(), method, **kw)
    plain_calls = len(recomputed)
    recomputed.clear()
    got, stats = compute_scores(model, tok, records(), method, gradient_checkpointing=True, **kw)
    assert_same(got, ref)
    assert set(stats["layer_calls"].values()) == {stats["batches"]} == {3}
    # backward really recomputed the blocks (q_proj ran twice per batch) for gradient methods
    assert len(recomputed) == plain_calls * (1 if method == "wanda" else 2)
    assert not model.is_activation_checkpointing
    assert [m.training for m in model.modules()] == modes


def test_bf16_weights_give_float32_scores_close_to_float32_run(tiny_ckpt, data, tmp_path):
    common = ["--model", tiny_ckpt, "--data", data, "--nsamples", 6, "--max-length", 64]
    for method in METHODS:
        assert run(*common, "--method", method, "--out", tmp_path / f"f32-{method}") == 0
        assert run(*common, "--method", method, "--out", tmp_path / f"bf16-{method}", "--dtype", "bfloat16") == 0
        (ref, _), (got, meta) = _pair(load_scores(tmp_path / f"f32-{method}")), _pair(load_scores(tmp_path / f"bf16-{method}"))
        assert meta["dtype"] == "bfloat16" and meta["score_dtype"] == "float32"
        assert all(v.dtype == torch.float32 for v in got.values())
        for k in ref:  # bf16 keeps ~3 significant digits: close in norm, not bitwise
            rel = (got[k] - ref[k]).norm() / ref[k].norm()
            assert rel < 0.05, (method, k, rel.item())
