"""End to end: hand-made score dirs + a saved tiny checkpoint -> a loadable pruned checkpoint."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harmprune.cli import main
from harmprune.core import manifest
from harmprune.core.errors import HarmpruneError
from harmprune.core.models import load_model, model_hash
from harmprune.core.targets import select_linears
from harmprune.pruning import checkpoint
from harmprune.pruning.prune import ApplyMaskConfig, PruneConfig, apply_mask_stage, prune
from harmprune.pruning.select import PruneWarning

pytestmark = pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")


def write_scores(d: Path, tensors: dict, method: str, mhash: str, spec="tiny") -> str:
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "scores.safetensors"))
    manifest.write_json(d / "meta.json", {"method": method, "model": spec, "model_hash": mhash, "dtype": "float32",
                                          "shapes": {k: list(v.shape) for k, v in tensors.items()}})
    return str(d)


@pytest.fixture
def setup(tiny_ckpt, tmp_path):
    handle = load_model(tiny_ckpt)
    model = handle.model
    keys = [f"{n}.weight" for n in select_linears(model)]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    harm = {k: torch.randn(params[k].shape, generator=g) for k in keys}
    benign = {k: torch.rand(params[k].shape, generator=g) for k in keys}
    h = model_hash(model)
    return {
        "ckpt": tiny_ckpt, "model": model, "handle": handle, "harm": harm, "benign": benign, "hash": h, "tmp": tmp_path,
        "harm_dir": write_scores(tmp_path / "harm", harm, "snip", h),
        "benign_dir": write_scores(tmp_path / "benign", benign, "snip-abs", h),
    }


def cfg(s, out="out", **kw):
    base = dict(model=s["ckpt"], harm_scores=s["harm_dir"], benign_scores=s["benign_dir"], q=0.05, p=0.05, out=str(s["tmp"] / out))
    return PruneConfig(**{**base, **kw})


def reference_mask(harm, benign, q, p):
    """Per-matrix set difference written plainly: stable sorts of -S_harm and S_benign."""
    out = {}
    for k in harm:
        n = harm[k].numel()
        top_h = torch.sort(-harm[k].reshape(-1), descending=True, stable=True).indices[: int(q * n)]
        top_b = torch.sort(benign[k].reshape(-1), descending=True, stable=True).indices[: int(p * n)]
        m = torch.zeros(n, dtype=torch.bool)
        m[top_h] = True
        m[top_b] = False
        out[k] = m.reshape(harm[k].shape)
    return out


def no_temp_left(tmp: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.tmp-") for p in tmp.iterdir())


def test_prune_writes_loadable_checkpoint(setup, tok):
    s = setup
    out = prune(cfg(s))
    orig = s["model"].state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(out)
    mask = checkpoint.load_mask(out)
    expect = reference_mask(s["harm"], s["benign"], 0.05, 0.05)
    assert set(mask) == {k for k, m in expect.items() if m.any()}
    for k in mask:
        assert mask[k].dtype == torch.bool and torch.equal(mask[k], expect[k])
    # every parameter: exact zeros under the mask, original values elsewhere
    for name, p in pruned.state_dict().items():
        m = mask.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert bool((p[m] == 0).all()), name
        assert torch.equal(p[~m], orig[name][~m]), name
    assert sum(int(m.sum()) for m in mask.values()) > 0
    # tied embedding / lm_head: intact and still tied
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert torch.equal(pruned.lm_head.weight, orig["model.embed_tokens.weight"])
    # tokenizer with chat template and generation config travel along
    t2 = AutoTokenizer.from_pretrained(out)
    assert t2.chat_template == tok.chat_template and t2.get_vocab() == tok.get_vocab()
    assert (out / "generation_config.json").is_file() and (out / "config.json").is_file()
    pc = manifest.read_json(out / "prune_config.json")
    assert pc["total_pruned"] == sum(int(m.sum()) for m in mask.values())
    assert pc["scores"]["harm"]["sha256"] == manifest.sha256_file(Path(s["harm_dir"]) / "scores.safetensors")
    assert pc["scores"]["benign"]["meta"]["method"] == "snip-abs"
    assert pc["model"]["model_hash"] == s["hash"] and pc["mask_sha256"] == manifest.sha256_file(out / "mask.safetensors")
    assert pc["settings"]["q"] == 0.05 and pc["versions"]["torch"]
    assert pc["per_matrix"]["model.layers.0.mlp.down_proj.weight"]["numel"] == 32 * 64


def test_scale_action(setup):
    s = setup
    out = prune(cfg(s, action="scale", alpha=0.5))
    pruned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    mask = checkpoint.load_mask(out)
    orig = s["model"].state_dict()
    for k, m in mask.items():
        assert torch.equal(pruned[k][m], orig[k][m] * 0.5) and torch.equal(pruned[k][~m], orig[k][~m])


def test_random_control_checkpoint_same_counts(setup):
    s = setup
    main_out = prune(cfg(s, out="a"))
    ctl_out = prune(cfg(s, out="b", control="random", seed=1))
    a, b = checkpoint.load_mask(main_out), checkpoint.load_mask(ctl_out)
    assert {k: int(v.sum()) for k, v in a.items()} == {k: int(v.sum()) for k, v in b.items()}
    assert not all(torch.equal(a[k], b[k]) for k in a)
    pruned = AutoModelForCausalLM.from_pretrained(ctl_out).state_dict()
    assert all(bool((pruned[k][m] == 0).all()) for k, m in b.items())


def test_p_zero_without_benign(setup):
    s = setup
    with pytest.warns(PruneWarning, match="super weights"):
        out = prune(cfg(s, benign_scores=None, p=0.0))
    assert "benign" not in manifest.read_json(out / "prune_config.json")["scores"]
    with pytest.raises(HarmpruneError, match="--benign"):
        cfg(s, benign_scores=None, p=0.01)


def test_refuses_scores_of_another_model(setup):
    s = setup
    bad = write_scores(s["tmp"] / "other", s["harm"], "snip", "0" * 64)
    with pytest.raises(HarmpruneError, match="different model"):
        prune(cfg(s, harm_scores=bad, benign_scores=None, p=0.0))
    with pytest.raises(HarmpruneError, match="different models"):
        prune(cfg(s, benign_scores=bad))
    shapes = dict(s["harm"])
    shapes["model.layers.0.mlp.down_proj.weight"] = torch.randn(64, 32)
    bad = write_scores(s["tmp"] / "shapes", shapes, "snip", s["hash"])
    with pytest.raises(HarmpruneError, match="shape"):
        prune(cfg(s, harm_scores=bad, benign_scores=None, p=0.0))
    assert not (s["tmp"] / "out").exists()


def test_refuses_non_empty_out(setup):
    s = setup
    (s["tmp"] / "out").mkdir()
    (s["tmp"] / "out" / "keep.txt").write_text("x")
    with pytest.raises(HarmpruneError, match="overwrite"):
        prune(cfg(s))
    assert (s["tmp"] / "out" / "keep.txt").exists()
    out = prune(cfg(s, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "mask.safetensors").exists()


@pytest.mark.parametrize("where,exc", [("model", RuntimeError), ("mask", KeyboardInterrupt)])
def test_failure_during_save_leaves_nothing(setup, monkeypatch, where, exc):
    s = setup

    def boom(*a, **kw):
        raise exc("injected")

    if where == "model":
        monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    else:
        monkeypatch.setattr(checkpoint, "save_mask", boom)
    with pytest.raises(exc):
        prune(cfg(s))
    assert not (s["tmp"] / "out").exists() and no_temp_left(s["tmp"], "out")


def test_apply_mask_round_trip(setup, tmp_path):
    s = setup
    pruned = prune(cfg(s))
    again = apply_mask_stage(ApplyMaskConfig(model=s["ckpt"], mask=str(pruned / "mask.safetensors"),
                                             out=str(tmp_path / "again")))
    a = AutoModelForCausalLM.from_pretrained(pruned).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    pc = manifest.read_json(again / "prune_config.json")
    assert pc["source_mask"]["sha256"] == manifest.sha256_file(pruned / "mask.safetensors")
    assert pc["source_mask"]["prune_config"]["settings"]["q"] == 0.05
    # a directory works as --mask too
    apply_mask_stage(ApplyMaskConfig(model=s["ckpt"], mask=str(pruned), out=str(tmp_path / "again2")))


def test_apply_mask_mismatch(setup, tmp_path, tok):
    s = setup
    from tiny import save_tiny, tiny_llama

    other = save_tiny(tmp_path / "wide", tiny_llama(tok, hidden=16), tok)
    pruned = prune(cfg(s))
    with pytest.raises(HarmpruneError, match="shape"):
        apply_mask_stage(ApplyMaskConfig(model=other, mask=str(pruned), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() and no_temp_left(tmp_path, "x")


def test_cli_prune_and_errors(setup, capsys):
    s = setup
    out = str(s["tmp"] / "cli")
    argv = ["prune", "--model", s["ckpt"], "--harm-scores", s["harm_dir"], "--benign-scores", s["benign_dir"],
            "--q", "0.05", "--p", "0.05", "--scope", "row", "--out", out]
    assert main(argv) == 0
    assert "pruned" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    capsys.readouterr()
    assert main(argv) == 2  # non-empty --out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harmprune: error:") and "--overwrite" in err[0]
    assert main(argv[:-1] + [str(s["tmp"] / "cli2"), "--q", "2"]) == 2
    assert main(["apply-mask", "--model", s["ckpt"], "--mask", str(s["tmp"] / "nope"), "--out", out + "3"]) == 2
    assert "not found" in capsys.readouterr().err


def test_global_and_magnitude_end_to_end(setup):
    s = setup
    out = prune(cfg(s, scope="global", control="magnitude"))
    pc = manifest.read_json(out / "prune_config.json")
    mask = checkpoint.load_mask(out)
    for k, row in pc["per_matrix"].items():
        assert row["pruned"] == row["harm_specific"] == int(mask[k].sum()) if k in mask else row["pruned"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # q and p > 0 at global scope: no warning expected
        prune(cfg(s, out="g2", scope="global"))


def test_prune_loaded_matches_stage_and_restores_model(setup):
    from harmprune.pruning.checkpoint import load_scores
    from harmprune.pruning.prune import prune_loaded
    from harmprune.pruning.select import select_prune_set

    s = setup
    model = s["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    harm, benign = load_scores(s["harm_dir"]), load_scores(s["benign_dir"])
    mask, stats = select_prune_set(harm.tensors, benign.tensors, "snip", "snip-abs", 0.05, 0.05, "matrix")
    out = prune_loaded(cfg(s, out="loaded"), s["handle"], harm, benign, mask, stats, extra={"note": 1})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored
    ref = AutoModelForCausalLM.from_pretrained(prune(cfg(s))).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert manifest.read_json(out / "prune_config.json")["note"] == 1
