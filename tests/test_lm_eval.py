"""lm-eval on the in-memory (pruned) model, with the shipped offline task ``harmprune_mc``.

The reference is written out plainly here: for every item, the loglikelihood of each choice
(" " + choice after "Question: ...\\nAnswer:") under the model, summed over the choice's tokens, and
accuracy = share of items whose argmax is the answer. lm-eval must reproduce it on the model object
it was handed (a model changed in memory gives the changed model's numbers) and must not load any
model by name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("lm_eval")

from harmprune.data import path as builtin_file  # noqa: E402
from harmprune.evals.utility import run_lm_eval, shipped_lm_eval_tasks  # noqa: E402
from tiny import randomize_matrices, save_tiny, tiny_llama  # noqa: E402

TASK = "harmprune_mc"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def items() -> list[dict]:
    path = builtin_file("lm_eval") / f"{TASK}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def reference_logliks(model, tok, n: int | None = None) -> list[list[float]]:
    """Per item (the first ``n``), per choice: sum of log p(choice token | everything before it).
    The four choices of an item run as one right-padded batch (causal: padding after a sequence
    does not change its logits)."""
    out = []
    dev = next(model.parameters()).device
    for it in items()[:n]:
        context = f"Question: {it['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        wholes = [tok(context + " " + c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
        assert all(w[: len(ctx)] == ctx for w in wholes)
        width = max(map(len, wholes))
        ids = torch.tensor([w + [0] * (width - len(w)) for w in wholes], device=dev)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in wholes], device=dev)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        out.append([sum(float(logp[b, i - 1, w[i]]) for i in range(len(ctx), len(w))) for b, w in enumerate(wholes)])
    return out


def reference_acc(logliks) -> float:  # over the first len(logliks) items
    hits = [max(range(len(r)), key=lambda j: r[j]) == it["answer"] for r, it in zip(logliks, items())]
    return sum(hits) / len(hits)


def lm_eval_logliks(rows) -> dict[int, list[float]]:
    return {r["doc_id"]: [c[0] for c in r["responses"]] for r in rows}


def test_shipped_task_is_listed_and_has_a_few_dozen_items():
    assert TASK in shipped_lm_eval_tasks()
    its = items()
    assert 30 <= len(its) <= 60
    assert all(len(i["choices"]) == 4 and 0 <= i["answer"] < 4 for i in its)


@pytest.fixture
def no_reload(monkeypatch):
    """Fail if anything loads a model by name while lm-eval runs."""
    from transformers import PreTrainedModel

    def refuse(cls, *a, **k):
        raise AssertionError(f"model re-loaded by name: {a[:1]}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def test_run_lm_eval_uses_the_model_in_memory(tok, no_reload):
    model = tiny_llama(tok, layers=2, hidden=32)
    randomize_matrices(model, torch.Generator().manual_seed(1))
    before = reference_logliks(model, tok)
    with torch.no_grad():  # change the model in memory, as pruning does
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.mul_(3.0)
    after = reference_logliks(model, tok)
    assert max(abs(a - b) for ra, rb in zip(before, after) for a, b in zip(ra, rb)) > 1e-2

    metrics, rows, note = run_lm_eval(model, tok, [TASK], limit=0, batch_size=8)
    assert note is None
    got = lm_eval_logliks(rows)
    assert sorted(got) == list(range(len(items())))
    for i, ref in enumerate(after):
        assert got[i] == pytest.approx(ref, abs=1e-3), i
    assert metrics[f"lm_eval/{TASK}"]["acc"] == pytest.approx(reference_acc(after), abs=1e-12)
    assert {r["acc"] for r in rows} <= {0.0, 1.0}


def test_eval_utility_cli_lm_eval_end_to_end(tmp_path, tok, monkeypatch):
    """`harmprune eval utility --parts lm_eval --lm-eval-tasks harmprune_mc`: the model is loaded once
    (by harmprune) and lm-eval's numbers are those of that model."""
    from transformers import PreTrainedModel

    from harmprune.cli import main

    model = tiny_llama(tok)
    randomize_matrices(model, torch.Generator().manual_seed(2))
    ckpt = save_tiny(tmp_path / "ckpt", model, tok)
    ref = reference_logliks(model, tok, 12)

    calls = []
    orig = PreTrainedModel.from_pretrained.__func__

    def counting(cls, *a, **k):
        calls.append(a[:1])
        return orig(cls, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    out = tmp_path / "util"
    rc = main(["eval", "utility", "--model", ckpt, "--parts", "lm_eval", "--lm-eval-tasks", TASK,
               "--lm-eval-limit", "12", "--batch-size", "4", "--out", str(out)])
    assert rc in (0, None)
    assert len(calls) == 1, calls  # harmprune's own load; lm-eval re-loaded nothing
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    got = lm_eval_logliks([r for r in rows if r["part"] == "lm_eval"])
    assert sorted(got) == list(range(12))
    for i in range(12):
        assert got[i] == pytest.approx(ref[i], abs=1e-3)
    hits = [max(range(4), key=lambda j: ref[i][j]) == items()[i]["answer"] for i in range(12)]
    assert res["results"][f"lm_eval/{TASK}"]["acc"] == pytest.approx(sum(hits) / 12, abs=1e-12)


def test_without_lm_eval_the_part_is_skipped_with_a_note(tok, monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    metrics, rows, note = run_lm_eval(tiny_llama(tok), tok, [TASK], limit=0, batch_size=1)
    assert (metrics, rows) == ({}, []) and "lm_eval is not installed" in note


@pytest.mark.real
def test_real_embedded_model_lm_eval(monkeypatch):
    """The embedded SmolLM2-135M-Instruct, pruned in memory, through lm-eval equals the plain reference."""
    from transformers import PreTrainedModel

    from harmprune.core.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    with torch.no_grad():  # a crude in-memory "pruning": zero one MLP matrix
        model.model.layers[3].mlp.down_proj.weight.zero_()
    n = 10  # a CPU-sized slice of the task
    ref = reference_logliks(model, tok, n)

    def refuse(cls, *a, **k):
        raise AssertionError(f"model re-loaded by name: {a[:1]}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    metrics, rows, _ = run_lm_eval(model, tok, [TASK], limit=n, batch_size=8)
    got = lm_eval_logliks(rows)
    for i, r in enumerate(ref):
        assert got[i] == pytest.approx(r, abs=2e-3), i
    assert metrics[f"lm_eval/{TASK}"]["acc"] == pytest.approx(reference_acc(ref), abs=1e-12)
