"""The engine against an independent brute force: a plain per-sample autograd loop (gradients) and
a plain per-sample forward with hooks (wanda inputs), one unpadded sample at a time."""

import pytest
import torch
from tiny import make_tokenizer, tiny_llama, tiny_qwen2

from harmprune.attribution import compute_scores
from harmprune.core import formatting
from harmprune.core.data import Record
from harmprune.core.errors import HarmpruneError

TOL = 1e-5


def records(n=6):
    # Different prompt and response lengths so that every batch carries padding.
    words = ["how do I", "tell me", "explain", "write", "list the steps to", "describe"]
    return [Record(prompt=f"{words[i % 6]} thing {i}" + " now" * (i % 3),
                   response=f"Sure, step {i}: " + "do it. " * (1 + (i * 5) % 7)) for i in range(n)]


def default_linears(model):
    # The default targets written out plainly: every nn.Linear inside a numbered block.
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def brute_force(model, tok, recs, method, fmt, max_length=64, wanda_tokens="response"):
    """Reference scores, one sample at a time, no padding, written without the engine."""
    key = (id(model), tuple((r.prompt, r.response) for r in recs), method, fmt, max_length, wanda_tokens)
    if key not in _CACHE:
        _CACHE[key] = _brute_force(model, tok, recs, method, fmt, max_length, wanda_tokens)
    return _CACHE[key]


_CACHE: dict = {}


def _brute_force(model, tok, recs, method, fmt, max_length, wanda_tokens):
    enc = formatting.encode(recs, tok, formatting.resolve_format(tok, fmt), max_length)
    lins = default_linears(model)
    weights = {n: m.weight for n, m in lins.items()}
    if method == "wanda":
        sq = {n: torch.zeros(m.in_features) for n, m in lins.items()}
        for e in enc.items:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor(e.labels)
            keep = labels != -100 if wanda_tokens == "response" else torch.ones_like(labels, dtype=torch.bool)
            seen = {}
            hs = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0][0].detach()))
                  for n, m in lins.items()]
            with torch.no_grad():
                model(input_ids=ids)
            for h in hs:
                h.remove()
            for n in lins:
                x = seen[n][keep].double()
                sq[n] += (x * x).sum(0).float()
        return {f"{n}.weight": weights[n].detach().abs() * sq[n].sqrt()[None, :] for n in lins}
    gsum = {n: torch.zeros_like(w) for n, w in weights.items()}
    gabs = {n: torch.zeros_like(w) for n, w in weights.items()}
    for p in model.parameters():
        p.requires_grad_(True)
    for e in enc.items:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels])
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep])  # mean over response tokens
        grads = torch.autograd.grad(nll, list(weights.values()))
        for n, g in zip(weights, grads):
            gsum[n] += g
            gabs[n] += g.abs()
    for p in model.parameters():
        p.requires_grad_(False)
    snip = {f"{n}.weight": weights[n].detach() * gsum[n] for n in lins}
    snip_abs = {f"{n}.weight": weights[n].detach().abs() * gabs[n] for n in lins}
    # one loop serves both gradient methods
    _CACHE[(id(model), tuple((r.prompt, r.response) for r in recs), "snip-abs" if method == "snip" else "snip",
            fmt, max_length, wanda_tokens)] = snip_abs if method == "snip" else snip
    return snip if method == "snip" else snip_abs


def assert_close(got, ref, tol=TOL):
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == torch.float32, k
        err = ((got[k].double() - ref[k].double()).norm() / ref[k].double().norm()).item()
        assert err < tol, f"{k}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def models():
    tok = make_tokenizer()
    return tok, {"llama": tiny_llama(tok, seed=1), "qwen2": tiny_qwen2(tok, seed=2)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["chat", "raw"])
@pytest.mark.parametrize("method", ["snip", "snip-abs", "wanda"])
def test_matches_brute_force_with_padding(models, arch, fmt, method):
    tok, ms = models
    model, recs = ms[arch], records(7)
    ref = brute_force(model, tok, recs, method, fmt)
    got, stats = compute_scores(model, tok, recs, method, fmt=fmt, max_length=64, batch_size=3, progress=False)
    assert stats["samples"] == 7 and stats["format"] == fmt
    assert_close(got, ref)


@pytest.mark.parametrize("method", ["snip", "snip-abs", "wanda"])
def test_batch_size_one_equals_eight(models, method):
    tok, ms = models
    kw = dict(fmt="chat", max_length=64, progress=False)
    one, _ = compute_scores(ms["qwen2"], tok, records(8), method, batch_size=1, **kw)
    eight, _ = compute_scores(ms["qwen2"], tok, records(8), method, batch_size=8, **kw)
    assert_close(eight, one)


def test_wanda_all_tokens(models):
    tok, ms = models
    ref = brute_force(ms["llama"], tok, records(5), "wanda", "chat", wanda_tokens="all")
    got, _ = compute_scores(ms["llama"], tok, records(5), "wanda", fmt="chat", max_length=64, batch_size=4,
                            wanda_tokens="all", progress=False)
    assert_close(got, ref)
    resp, _ = compute_scores(ms["llama"], tok, records(5), "wanda", fmt="chat", max_length=64, progress=False)
    assert not torch.allclose(resp["model.layers.0.mlp.up_proj.weight"], got["model.layers.0.mlp.up_proj.weight"])


def test_truncation_and_skips_are_reported(models):
    tok, ms = models
    recs = records(4) + [Record(prompt="x" * 80, response="never fits")]
    got, stats = compute_scores(ms["llama"], tok, recs, "snip", fmt="raw", max_length=40, progress=False)
    assert stats["skipped"] == 1 and stats["samples"] == 4
    assert_close(got, brute_force(ms["llama"], tok, recs, "snip", "raw", max_length=40))


def test_engine_leaves_model_as_it_was(models):
    tok, ms = models
    model = ms["llama"]
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    compute_scores(model, tok, records(3), "snip", fmt="chat", progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was materialised
    model.eval()


def test_tied_weights_not_scored_by_default():
    tok = make_tokenizer()
    tied = tiny_llama(tok, tie=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    got, _ = compute_scores(tied, tok, records(2), "snip", fmt="chat", progress=False)
    assert "lm_head.weight" not in got and not any("embed" in k for k in got)
    assert set(got) == {f"{n}.weight" for n in default_linears(tied)}
    # Named explicitly, the tied head is scored (and the user is told what it is tied to).
    got, _ = compute_scores(tied, tok, records(2), "snip", fmt="chat", targets=["lm_head"], progress=False)
    assert list(got) == ["lm_head.weight"]


def test_targets_and_ignore_select_by_full_name(models):
    tok, ms = models
    got, _ = compute_scores(ms["llama"], tok, records(2), "wanda", fmt="chat", targets=["*.mlp.*"],
                            ignore=["re:.*\\.1\\..*"], progress=False)
    assert sorted(got) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                           "model.layers.0.mlp.up_proj.weight"]
    params = dict(ms["llama"].named_parameters())
    assert all(got[k].shape == params[k].shape for k in got)
    with pytest.raises(HarmpruneError, match="matches no linear"):
        compute_scores(ms["llama"], tok, records(2), "snip", fmt="chat", targets=["*.nothing"], progress=False)


def test_bf16_model_gives_float32_scores_close_to_fp32(models):
    tok, ms = models
    fp32 = ms["llama"]
    bf16 = tiny_llama(tok, seed=1).to(torch.bfloat16)
    for method in ("snip-abs", "wanda"):
        ref, _ = compute_scores(fp32, tok, records(4), method, fmt="chat", progress=False)
        got, _ = compute_scores(bf16, tok, records(4), method, fmt="chat", progress=False)
        assert all(v.dtype == torch.float32 for v in got.values())
        assert_close(got, ref, tol=0.05)  # bf16 activations carry ~3 significant digits


def test_nan_loss_names_the_record(models):
    tok, _ = models
    model = tiny_llama(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(HarmpruneError, match=r"loss is nan for record \d+ \(batch 0, sample 0\)"):
        compute_scores(model, tok, records(3), "snip", fmt="chat", progress=False)
    with pytest.raises(HarmpruneError, match="not finite"):
        compute_scores(model, tok, records(3), "wanda", fmt="chat", progress=False)


def test_unknown_method(models):
    tok, ms = models
    with pytest.raises(HarmpruneError, match="unknown method"):
        compute_scores(ms["llama"], tok, records(2), "magnitude", fmt="chat", progress=False)


def planted_model(tok):
    """A one-layer Llama whose "!" completions hinge on one weight, o_proj[j, p].

    Every embedding has a constant part on dims D; value channel p reads it (spread over 8 weights,
    so no single v_proj entry matters much); o_proj[j, p] alone copies it to residual dim j; the
    head reads dim j into the "!" logit. By homogeneity o_proj[j, p]'s SNIP equals the sum of the 8
    v_proj entries' SNIPs, so it must come out 8 times more negative than any of them.
    """
    model = tiny_llama(tok, seed=3, layers=1, hidden=32, tie=False)
    bang = tok.convert_tokens_to_ids("!")
    dims, j, p = list(range(8)), 20, 5
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dims] = 1.0
        attn.v_proj.weight[p, :] = 0
        attn.v_proj.weight[p, dims] = 0.5
        attn.o_proj.weight[:, p] = 0
        attn.o_proj.weight[j, p] = 0.5
        model.lm_head.weight[bang, :] = 0
        model.lm_head.weight[bang, j] = 1.0
    chain = [("model.layers.0.self_attn.v_proj.weight", (p, d)) for d in dims]
    return model, ("model.layers.0.self_attn.o_proj.weight", (j, p)), chain


def test_planted_weight_has_most_negative_snip():
    tok = make_tokenizer()
    model, planted, chain = planted_model(tok)
    recs = [Record(f"question {i}", "!" * (5 + i)) for i in range(4)]
    batch = formatting.collate(formatting.encode(recs, tok, "raw", 64).items, tok.pad_token_id)
    params = dict(model.named_parameters())

    def loss():
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return formatting.per_sample_nll(out, batch["labels"]).sum().item()

    def loss_without(key, idx):
        w = params[key]
        old = w[idx].item()
        with torch.no_grad():
            w[idx] = 0
        try:
            return loss()
        finally:
            with torch.no_grad():
                w[idx] = old

    # The construction: zeroing the planted weight raises the loss far more than zeroing any of its
    # chain, or the 5 largest and 5 random other entries of every matrix.
    gen = torch.Generator().manual_seed(0)
    others = list(chain)
    for key in default_linears(model):
        key = f"{key}.weight"
        w = params[key].detach()
        picks = w.abs().flatten().topk(5).indices.tolist() + torch.randint(w.numel(), (5,), generator=gen).tolist()
        for flat in picks:
            idx = tuple(divmod(flat, w.shape[1]))
            if (key, idx) != planted:
                others.append((key, idx))
    base = loss()
    rise = loss_without(*planted) - base
    assert rise > 5 and all(loss_without(k, i) - base < rise / 4 for k, i in others)

    scores, _ = compute_scores(model, tok, recs, "snip", fmt="raw", progress=False)
    key, idx = planted
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert scores[key][idx] == flat.min() and scores[key][idx] < 0
    assert all(scores[key][idx] < 4 * scores[k][i] for k, i in chain)  # 8x by homogeneity, with margin
