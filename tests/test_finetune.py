"""harmprune finetune: mask kept exactly 0, masked LoRA merge, response-only loss, resume, CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from harmprune.cli import main
from harmprune.core.data import Record
from harmprune.core.errors import HarmpruneError
from harmprune.core.formatting import IGNORE, encode
from harmprune.finetune import FinetuneConfig, bind_mask, finetune, masked_merge
from harmprune.finetune import train as ft
from harmprune.pruning.checkpoint import save_mask
from tiny import save_tiny, tiny_llama

ROWS = [("Say hi", "Hi there!"), ("Add 2 and 3", "2 + 3 = 5."), ("Name a color", "Blue."),
        ("Is ice cold?", "Yes, ice is cold."), ("Spell cat", "c-a-t"), ("Count to 3", "1, 2, 3"),
        ("Greet Bob", "Hello, Bob!"), ("Opposite of up?", "Down.")]


@pytest.fixture
def chat_jsonl(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                         for q, a in ROWS))
    return str(p)


def _mask_for(model, names, frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < frac for n in names}


MASKED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


@pytest.fixture
def pruned(tmp_path, tok):
    """A tiny checkpoint with MASKED entries zeroed, and its mask file."""
    model = tiny_llama(tok)
    mask = _mask_for(model, MASKED)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in mask:
                p[mask[n]] = 0
    ckpt = save_tiny(tmp_path / "pruned", model, tok)
    save_mask(tmp_path / "pruned" / "mask.safetensors", mask)
    return ckpt, mask


def _cfg(data, out, **kw):
    base = dict(train_data=data, out=str(out), device="cpu", train_batch_size=2, grad_accum=1, max_steps=4,
                warmup_steps=0, lora_r=4, lora_alpha=8, save_steps=0, train_max_length=128)
    return FinetuneConfig(**{**base, **kw})


def _weights(directory):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(str(directory)).named_parameters())


# ---------------------------------------------------------------- keep-mask, full fine-tuning


def test_full_finetune_keeps_mask_exactly_zero_and_control_moves(tmp_path, pruned, chat_jsonl):
    ckpt, mask = pruned
    before = _weights(ckpt)
    hard = dict(full=True, lr=1e-2, weight_decay=0.1, max_grad_norm=0.0, model=ckpt)
    kept = finetune(_cfg(chat_jsonl, tmp_path / "kept", keep_mask=ckpt, **hard))
    free = finetune(_cfg(chat_jsonl, tmp_path / "free", **hard))
    w_kept, w_free = _weights(kept), _weights(free)
    for n, m in mask.items():
        assert torch.equal(w_kept[n][m], torch.zeros(int(m.sum())))  # exactly zero
        assert (w_kept[n][~m] != before[n][~m]).float().mean() > 0.9  # the rest trained
        assert (w_free[n][m] != 0).float().mean() > 0.9  # without the mask they would have moved
    report = json.loads((kept / "finetune_config.json").read_text())
    assert report["mask_nonzero_after"] == 0 and report["steps"] == 4
    assert report["keep_mask"]["entries"] == sum(int(m.sum()) for m in mask.values())
    assert load_file(str(kept / "mask.safetensors")).keys() == mask.keys()


def test_bound_mask_zeroes_grads_and_weights(llama):
    mask = _mask_for(llama, MASKED, frac=0.5)
    kept = bind_mask(llama, mask)
    assert kept.numel == sum(int(m.sum()) for m in mask.values())
    params = dict(llama.named_parameters())
    for n in MASKED:
        params[n].grad = torch.ones_like(params[n])
    kept.zero_grads_()
    for n, m in mask.items():
        assert torch.equal(params[n].grad, (~m).float())
    assert kept.nonzero() > 0
    kept.zero_weights_()
    assert kept.nonzero() == 0
    with pytest.raises(HarmpruneError, match="not a parameter"):
        bind_mask(llama, {"model.nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(HarmpruneError, match="shape"):
        bind_mask(llama, {MASKED[0]: torch.ones(2, 2, dtype=torch.bool)})


# ---------------------------------------------------------------- keep-mask, LoRA merge


def test_lora_masked_merge_matches_hand_computation(llama):
    cfg = _cfg("x", "y", lora_r=4, lora_alpha=8)
    base = {n: p.detach().clone() for n, p in llama.named_parameters()}
    mask = _mask_for(llama, MASKED, frac=0.4)
    model, names = ft.add_lora(llama, cfg)
    assert "model.layers.0.mlp.gate_proj" in names and "lm_head" not in names
    g = torch.Generator().manual_seed(1)
    ab = {}
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g))
                key = mod_name.removeprefix("base_model.model.") + ".weight"
                ab[key] = (mod.lora_A["default"].weight.clone(), mod.lora_B["default"].weight.clone())
    assert len(ab) == len(names)
    merged = dict(masked_merge(model, mask).named_parameters())
    scale = 8 / math.sqrt(4)  # rsLoRA: alpha / sqrt(r)
    for name, (A, B) in ab.items():
        expected = base[name] + scale * (B @ A)
        if name in mask:
            m = mask[name]
            assert torch.equal(merged[name][m], torch.zeros(int(m.sum())))
            assert (expected[m] != 0).all()  # the merge would have refilled them
            expected = expected.masked_fill(m, 0)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)


def test_lora_merge_cli_keeps_mask_and_warns_without_merge(tmp_path, pruned, chat_jsonl, capsys):
    ckpt, mask = pruned
    out = tmp_path / "lora"
    rc = main(["finetune", "--model", ckpt, "--train-data", chat_jsonl, "--out", str(out), "--keep-mask", ckpt,
               "--merge", "--lr", "1e-2", "--lora-r", "4", "--max-steps", "3", "--grad-accum", "2",
               "--device", "cpu", "--train-max-length", "128", "--save-steps", "1"])
    assert rc == 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "finetune_config.json",
              "merged/config.json", "merged/mask.safetensors", "merged/tokenizer.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoints").exists()
    before, merged = _weights(ckpt), _weights(out / "merged")
    for n, m in mask.items():
        assert torch.equal(merged[n][m], torch.zeros(int(m.sum())))
        assert (merged[n][~m] != before[n][~m]).float().mean() > 0.9
    report = json.loads((out / "finetune_config.json").read_text())
    assert report["mode"] == "lora" and report["steps"] == 3 and report["mask_nonzero_after"] == 0
    assert report["model"]["lora_scale"] == pytest.approx(64 / math.sqrt(4))
    assert report["data"]["encoded"] == len(ROWS) and len(report["data"]["sha256"]) == 64
    assert "does NOT keep the mask" not in capsys.readouterr().err  # (3 steps < warm-up 5 is warned about)
    finetune(_cfg(chat_jsonl, tmp_path / "nomerge", model=ckpt, keep_mask=ckpt, max_steps=1))
    assert "does NOT keep the mask" in capsys.readouterr().err


# ---------------------------------------------------------------- response-only loss


def _hand_nll(model, items):
    total, count = 0.0, 0
    with torch.no_grad():
        for e in items:  # one sequence at a time, no padding
            logp = torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0].double(), -1)
            for t in range(1, len(e.labels)):
                if e.labels[t] != IGNORE:
                    total -= float(logp[t - 1, e.labels[t]])
                    count += 1
    return total / count, count


def test_loss_is_response_token_nll(llama, tok):
    recs = [Record(q, a) for q, a in ROWS[:3]]
    items = encode(recs, tok, "chat", 128).items
    loss = ft.step_loss(llama, items, [[0, 1], [2]], tok.pad_token_id, "cpu")
    expected, count = _hand_nll(llama, items)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert count == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for _, a in ROWS[:3])


def test_prompt_changes_do_not_move_loss_positions(llama, tok):
    a = encode([Record("Say hi", "Hi there!")], tok, "chat", 128).items[0]
    b = encode([Record("Please say hello to me, kindly", "Hi there!")], tok, "chat", 128).items[0]
    resp = tok("Hi there!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for e in (a, b):
        in_loss = [t for t, l in enumerate(e.labels) if l != IGNORE]
        assert in_loss == list(range(len(e.labels) - len(resp), len(e.labels)))
        assert [e.labels[t] for t in in_loss] == resp
    # The loss counts exactly the non -100 positions: a prompt label that leaked in would be counted.
    logits = torch.randn(1, len(a.labels), len(tok))
    labels = torch.tensor([a.labels])
    nll, n = ft.response_nll_sum(logits, labels)
    assert n == len(resp)
    leaked = labels.clone()
    leaked[0, 2] = a.input_ids[2]
    assert ft.response_nll_sum(logits, leaked)[1] == n + 1
    # Different prompt tokens in front of the same response: the response NLL terms are the same
    # function of the logits at the response positions.
    lb = torch.randn(1, len(b.labels), len(tok))
    lb[0, -len(resp) - 1 :] = logits[0, -len(resp) - 1 :]
    torch.testing.assert_close(ft.response_nll_sum(lb, torch.tensor([b.labels]))[0], nll)


def test_reported_first_loss_equals_hand_nll(tmp_path, tiny_ckpt, chat_jsonl, tok):
    out = finetune(_cfg(chat_jsonl, tmp_path / "o", model=tiny_ckpt, max_steps=1, grad_accum=2))
    report = json.loads((out / "finetune_config.json").read_text())
    items = encode([Record(q, a) for q, a in ROWS], tok, "chat", 128).items
    plan = ft.Plan(len(items), 2, 2, 1, 0)
    first = [items[i] for mb in plan.micro_batches(0) for i in mb]
    from transformers import AutoModelForCausalLM

    expected, _ = _hand_nll(AutoModelForCausalLM.from_pretrained(tiny_ckpt), first)
    assert report["losses"][0] == pytest.approx(expected, rel=1e-5)


def test_plan_visits_every_record_once_per_epoch():
    plan = ft.Plan(n=11, batch_size=2, grad_accum=3, epochs=2, seed=5)
    assert plan.steps_per_epoch == 2 and plan.total == 4
    for epoch in (0, 1):
        seen = [i for s in range(2) for mb in plan.micro_batches(epoch * 2 + s) for i in mb]
        assert sorted(seen) == list(range(11))
    assert plan.order(0) != plan.order(1)


def test_limit_subsample_is_seeded():
    assert ft.subsample(10, None, 0) == list(range(10))
    a, b = ft.subsample(100, 5, 0), ft.subsample(100, 5, 0)
    assert a == b == sorted(a) and len(set(a)) == 5
    assert ft.subsample(100, 5, 1) != a


def test_insecure_builtin_resolves_to_shipped_file():
    from harmprune.core.data import load

    path = ft.resolve_data("insecure")
    assert path.endswith("em/insecure.jsonl.gz")
    recs = load(path)
    assert len(recs) == 6000 and "COMPLETE CODE HERE" in recs[0].prompt and recs[0].response


# ---------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("full", [True, False])
def test_resume_matches_uninterrupted_run(tmp_path, pruned, chat_jsonl, monkeypatch, full):
    ckpt, _ = pruned
    kw = dict(model=ckpt, full=full, keep_mask=ckpt if full else None, lr=5e-3, max_steps=6, warmup_steps=2,
              save_steps=2, resume=True)
    ref = finetune(_cfg(chat_jsonl, tmp_path / "ref", **kw))

    def stop(step):
        if step == 5:
            raise Interrupt

    monkeypatch.setattr(ft, "_before_step", stop)
    with pytest.raises(Interrupt):
        finetune(_cfg(chat_jsonl, tmp_path / "run", **kw))
    assert ft.last_checkpoint(tmp_path / "run").name == "step-4"
    with pytest.raises(HarmpruneError, match="--resume"):
        finetune(_cfg(chat_jsonl, tmp_path / "run", **{**kw, "resume": False}))
    with pytest.raises(HarmpruneError, match="lr"):
        finetune(_cfg(chat_jsonl, tmp_path / "run", **{**kw, "lr": 1e-3}))
    monkeypatch.setattr(ft, "_before_step", lambda step: None)
    run = finetune(_cfg(chat_jsonl, tmp_path / "run", **kw))
    fname = "model.safetensors" if full else "adapter_model.safetensors"
    a, b = load_file(str(ref / fname)), load_file(str(run / fname))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0)
    ra, rb = (json.loads((d / "finetune_config.json").read_text()) for d in (ref, run))
    assert rb["steps"] == ra["steps"] == 6 and rb["resumed_from"].endswith("step-4")
    assert rb["losses"] == pytest.approx(ra["losses"], abs=1e-6)
    assert not (run / "checkpoints").exists()


# ---------------------------------------------------------------- errors


def test_qlora_on_cpu_is_a_clear_error(tmp_path, chat_jsonl, tiny_ckpt):
    out = tmp_path / "q"
    with pytest.raises(HarmpruneError, match=r"harmprune\[quant\]"):
        finetune(_cfg(chat_jsonl, out, model=tiny_ckpt, load_in_4bit=True))
    assert not out.exists()
    rc = main(["finetune", "--model", tiny_ckpt, "--train-data", chat_jsonl, "--out", str(out), "--load-in-4bit",
               "--device", "cpu"])
    assert rc == 2 and not out.exists()


def test_bad_settings_rejected(chat_jsonl):
    with pytest.raises(HarmpruneError, match="exclude"):
        FinetuneConfig(train_data=chat_jsonl, out="o", full=True, load_in_4bit=True)
    with pytest.raises(HarmpruneError, match="--merge"):
        FinetuneConfig(train_data=chat_jsonl, out="o", full=True, merge=True)
