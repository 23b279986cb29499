import pytest
import torch

from harmprune.core.errors import HarmpruneError, MissingDependency
from harmprune.evals.generation import GenConfig, build_inputs, generate, generate_tokens, prefill_prefixes

PROMPTS = ["hi", "a much longer prompt here, with commas and more words", "mid length", "x" * 30, "Tell me"]


@pytest.fixture
def model(tok):
    """A tiny Llama with larger random weights (varied greedy text) and a boosted EOS row (some replies end early)."""
    from tiny import randomize_matrices, tiny_llama

    m = tiny_llama(tok, seed=3, tie=False)
    randomize_matrices(m, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.lm_head.weight[tok.eos_token_id] *= 2.5
    return m


def _context(tok, prompt, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _brute_greedy(model, ids, max_new, eos):
    """Greedy decoding written plainly: one full forward per new token, no cache, no padding."""
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_batched_greedy_equals_one_at_a_time(model, tok):
    cfg = GenConfig(max_new_tokens=14, gen_batch_size=3)
    ctx = [_context(tok, p) for p in PROMPTS]
    batched = generate_tokens(model, tok, ctx, cfg)
    single = generate_tokens(model, tok, ctx, GenConfig(max_new_tokens=14, gen_batch_size=1))
    brute = [_brute_greedy(model, c, 14, tok.eos_token_id) for c in ctx]
    assert [b[0] for b in batched] == brute
    assert [s[0] for s in single] == brute
    assert any(len(b) < 14 for b in brute) and any(len(b) == 14 for b in brute)  # EOS and the limit both hit
    texts = generate(model, tok, PROMPTS, cfg)
    assert texts == [[tok.decode(b, skip_special_tokens=True)] for b in brute]
    assert all("<pad>" not in t[0] and "<|im_end|>" not in t[0] for t in texts)


def test_max_new_tokens_respected(model, tok):
    out = generate_tokens(model, tok, [_context(tok, p) for p in PROMPTS], GenConfig(max_new_tokens=3, gen_batch_size=2))
    assert all(len(o[0]) <= 3 for o in out)
    assert max(len(o[0]) for o in out) == 3


def test_greedy_n_copies(model, tok):
    out = generate(model, tok, PROMPTS[:2], GenConfig(max_new_tokens=5, n=3))
    assert all(len(o) == 3 and len(set(o)) == 1 for o in out)


def test_sampling_is_seeded_and_reproducible(model, tok):
    cfg = GenConfig(max_new_tokens=10, temperature=1.0, n=3, gen_batch_size=2, seed=7)
    rng = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, cfg)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is left alone
    b = generate(model, tok, PROMPTS, cfg)
    c = generate(model, tok, PROMPTS, GenConfig(max_new_tokens=10, temperature=1.0, n=3, gen_batch_size=2, seed=8))
    assert a == b and a != c
    assert all(len(x) == 3 for x in a) and any(len(set(x)) > 1 for x in a)


def test_prefill_forces_reference_start(model, tok):
    refs = ["Sure, here is how to do it", "Step 1: get", "OK", "Absolutely. First,", "Here"]
    k = 5
    cfg = GenConfig(max_new_tokens=8, gen_batch_size=4, prefill=k)
    out = generate(model, tok, PROMPTS, cfg, prefill_texts=refs)
    heads = prefill_prefixes(tok, refs, k)
    assert heads == [r[:k] for r in refs]  # char-level tokenizer: k tokens = k characters
    for o, h, p, r in zip(out, heads, PROMPTS, refs):
        forced = tok(r, add_special_tokens=False)["input_ids"][:k]
        cont = _brute_greedy(model, _context(tok, p) + forced, 8, tok.eos_token_id)
        assert o[0].startswith(h)
        assert o[0] == tok.decode(forced + cont, skip_special_tokens=True)  # the reply includes the forced text, then the model's own


def test_system_prompts(model, tok):
    out = generate(model, tok, PROMPTS[:2], GenConfig(max_new_tokens=6), system=["Be brief.", None])
    want = [_brute_greedy(model, _context(tok, PROMPTS[0], "Be brief."), 6, tok.eos_token_id),
            _brute_greedy(model, _context(tok, PROMPTS[1]), 6, tok.eos_token_id)]
    assert out == [[tok.decode(w, skip_special_tokens=True)] for w in want]


def test_raw_format_inputs(tok):
    ctx, forced = build_inputs(tok, ["abc"], "raw", ["xyz"], 2)
    assert ctx[0] == tok("abc\n")["input_ids"] + tok("xy", add_special_tokens=False)["input_ids"]
    assert forced[0] == tok("xy", add_special_tokens=False)["input_ids"]


def test_bad_settings(model, tok):
    with pytest.raises(HarmpruneError, match="prefill needs reference"):
        generate(model, tok, ["a"], GenConfig(prefill=3))
    with pytest.raises(HarmpruneError, match="2 prefill texts for 1 prompts"):
        generate(model, tok, ["a"], GenConfig(prefill=3), prefill_texts=["x", "y"])
    with pytest.raises(HarmpruneError, match="temperature"):
        GenConfig(temperature=-1)
    with pytest.raises(HarmpruneError, match="top-p"):
        GenConfig(top_p=0)
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        with pytest.raises(MissingDependency, match="vllm"):
            generate(model, tok, ["a"], GenConfig(backend="vllm"))
        assert generate(model, tok, ["a"], GenConfig(backend="auto", max_new_tokens=2))  # falls back to hf


def test_default_batch_sorted_by_length_gives_the_one_at_a_time_greedy_replies(model, tok):
    """The engine's default batch (``--gen-batch-size 0``: 32 on a CPU) over prompts of many lengths,
    sorted longest first and left-padded, gives token for token the replies generated one at a time
    (and by plain uncached decoding)."""
    from harmprune.evals.backends import DEFAULT_BATCH, default_batch_size

    assert default_batch_size(torch.device("cpu")) == DEFAULT_BATCH["cpu"] and default_batch_size("cuda:1") == 64
    prompts = [("word " * (i * 7 % 23)).strip() + f" question {i}?" for i in range(DEFAULT_BATCH["cpu"] + 5)]
    ctx = [_context(tok, p) for p in prompts]
    assert len({len(c) for c in ctx}) > 10  # many lengths: real left padding in every batch
    auto = generate_tokens(model, tok, ctx, GenConfig(max_new_tokens=10))
    single = generate_tokens(model, tok, ctx, GenConfig(max_new_tokens=10, gen_batch_size=1))
    assert auto == single
    assert [s[0] for s in single[:6]] == [_brute_greedy(model, c, 10, tok.eos_token_id) for c in ctx[:6]]
    assert len({tuple(a[0]) for a in auto}) > 5  # replies depend on the prompt
