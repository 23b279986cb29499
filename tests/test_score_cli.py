"""``harmprune score`` end to end on a saved tiny checkpoint, and its refusals of bad input."""

import json

import pytest
import torch
from tiny import make_tokenizer, save_tiny, tiny_llama

from harmprune.attribution import compute_scores
from harmprune.attribution.artifact import load_scores
from harmprune.cli import main
from harmprune.core.data import load


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"how to do thing {i}?", "response": f"Sure, here is how {i}: " + "step. " * (i % 4 + 1),
         "category": "a" if i % 2 else "b"} for i in range(10)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", ROWS)


def run(*args):
    return main(["score", *map(str, args)])


def test_writes_loadable_scores_and_meta(tiny_ckpt, data, tmp_path, capsys):
    out = tmp_path / "scores"
    assert run("--model", tiny_ckpt, "--data", data, "--method", "snip-abs", "--out", out,
               "--nsamples", 6, "--batch-size", 4, "--max-length", 64) == 0
    s = load_scores(out)
    scores, meta = s.tensors, s.meta
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "scores.safetensors"]
    assert "model.layers.0.mlp.down_proj.weight" in scores and "lm_head.weight" not in scores
    assert all(v.dtype == torch.float32 and list(v.shape) == meta["shapes"][k] for k, v in scores.items())
    assert meta["method"] == "snip-abs" and meta["nsamples"]["used"] == 6 and meta["format"] == "chat"
    assert meta["data"]["rows"] == 10 and len(meta["data"]["sha256"]) == 64 and meta["model_hash"]
    assert meta["tokens"]["response"] > 0 and meta["peak_memory_bytes"] > 0
    assert "score" in capsys.readouterr().err  # banner (and progress bar) on stderr
    # Same as the in-memory API on the same 6 records chosen by the documented seeded shuffle.
    import random

    from harmprune.core.models import load_model

    order = list(range(10))
    random.Random(0).shuffle(order)
    model, tok = load_model(tiny_ckpt)
    recs = load(data)
    ref, _ = compute_scores(model, tok, [recs[i] for i in order[:6]], "snip-abs", max_length=64, progress=False)
    assert all(torch.allclose(scores[k], ref[k], rtol=1e-5, atol=1e-8) for k in ref)
    # A non-empty output directory is refused without --overwrite.
    assert run("--model", tiny_ckpt, "--data", data, "--method", "wanda", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run("--model", tiny_ckpt, "--data", data, "--method", "wanda", "--out", out, "--overwrite",
               "--category", "a", "--score-dtype", "bfloat16") == 0
    s = load_scores(out)
    scores, meta = s.tensors, s.meta
    assert meta["method"] == "wanda" and meta["nsamples"]["used"] == 5
    assert all(v.dtype == torch.bfloat16 for v in scores.values())


@pytest.fixture
def nan_ckpt(tmp_path):
    tok = make_tokenizer()
    model = tiny_llama(tok)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    return save_tiny(tmp_path / "nan-llama", model, tok)


@pytest.mark.parametrize("case", ["missing-file", "missing-field", "empty", "method", "targets", "nan"])
def test_bad_input_exits_2_with_one_line_and_no_output(case, tiny_ckpt, nan_ckpt, data, tmp_path, capsys):
    model, extra = tiny_ckpt, []
    method = "snip"
    if case == "missing-file":
        data = str(tmp_path / "nope.jsonl")
    elif case == "missing-field":
        extra = ["--response-field", "answer_text"]
    elif case == "empty":
        data = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("")
    elif case == "method":
        method = "magnitude"
    elif case == "targets":
        extra = ["--targets", "*.no_such_proj"]
    elif case == "nan":
        model = nan_ckpt
    out = tmp_path / "out"
    code = run("--model", model, "--data", data, "--method", method, "--out", out, "--max-length", 64, *extra)
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("harmprune: error")]
    assert code == 2 and len(err) == 1, err
    expected = {"missing-file": "nope.jsonl", "missing-field": "answer_text", "empty": "no rows",
                "method": "unknown method", "targets": "no_such_proj", "nan": "loss is nan"}[case]
    assert expected in err[0]
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
