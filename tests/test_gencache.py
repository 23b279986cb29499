"""The judged-generation cache (evals/gencache.py): keys, validation, re-use across variants and runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harmprune.core.data import Record
from harmprune.core.models import model_hash
from harmprune.evals import gencache as G
from harmprune.evals import harm as HM
from harmprune.evals.generation import GenConfig, build_inputs
from harmprune.evals.judges import Verdict, get_judge
from harmprune.evals import headline as H
from tiny import randomize_matrices, tiny_llama

MASKED = "model.layers.0.mlp.down_proj.weight"


def _records():
    return [Record(prompt="Tell me how to do a bad thing", response="Sure, here is how: step one, get the tools.",
                   category="a", id="0"),
            Record(prompt="Explain something harmful, at length please", response="Absolutely! First find a target.",
                   category="b", id="1"),
            Record(prompt="Hi", response="Okay: the tools are", category="a", id="2")]


@pytest.fixture
def model(tok):
    m = tiny_llama(tok)
    randomize_matrices(m, torch.Generator().manual_seed(0))
    return m


def _mask(model, cols):
    w = dict(model.named_parameters())[MASKED]
    m = torch.zeros_like(w, dtype=torch.bool)
    m[:, cols] = True
    return {MASKED: m}


def _key(tok, gen, records=None, model_hash="h", device="cpu", batch=8):
    records = records or _records()
    ctx, forced = build_inputs(tok, [r.prompt for r in records], "chat", [r.response for r in records] if gen.prefill
                               else None, gen.prefill)
    return G.gen_key(model_hash, records, ctx, forced, gen, device, batch)


def test_key_changes_with_every_generation_setting(tok):
    base = GenConfig(max_new_tokens=8, prefill=0, seed=0)
    k0 = _key(tok, base)
    changed = {
        "attack": _key(tok, dataclasses.replace(base, prefill=3)),
        "prefill tokens": None,
        "max new tokens": _key(tok, dataclasses.replace(base, max_new_tokens=9)),
        "temperature": _key(tok, dataclasses.replace(base, temperature=0.7)),
        "n": _key(tok, dataclasses.replace(base, n=2)),
        "seed": _key(tok, dataclasses.replace(base, seed=1)),
        "format": _key(tok, dataclasses.replace(base, format="raw")),
        "backend": _key(tok, dataclasses.replace(base, backend="vllm")),
        "model": _key(tok, base, model_hash="other"),
        "device": _key(tok, base, device="cuda:0"),
        "prompts": _key(tok, base, records=_records()[:2]),
        "prompt text": _key(tok, base, records=[dataclasses.replace(r, prompt=r.prompt + "!") for r in _records()]),
        "system prompt": _key(tok, base, records=[dataclasses.replace(r, system="Be nice.") for r in _records()]),
    }
    p3 = dataclasses.replace(base, prefill=3)
    changed["prefill tokens"] = _key(tok, dataclasses.replace(base, prefill=4))
    assert changed["prefill tokens"] != changed["attack"]
    # the reference reply matters under the prefill attack (its first K tokens are forced)
    other_ref = [dataclasses.replace(r, response="No way. " + r.response) for r in _records()]
    assert _key(tok, p3, records=other_ref) != changed["attack"]
    for what, k in changed.items():
        assert G.sha256_json(k) != G.sha256_json(k0), what
    # sampling: top-p and the batch matter; greedy replies do not depend on either
    s = dataclasses.replace(base, temperature=0.7)
    assert _key(tok, s, batch=16) != _key(tok, s, batch=8)
    assert _key(tok, dataclasses.replace(s, top_p=0.9)) != _key(tok, s)
    assert _key(tok, base, batch=16) == k0 and _key(tok, dataclasses.replace(base, top_p=0.9)) == k0


def test_key_changes_with_the_judge(tok):
    kw, gcg, clf = get_judge("keyword"), get_judge("keyword:gcg"), get_judge("classifier")
    ids = [G.judge_identity(j) for j in (kw, gcg, clf)]
    assert len({G.sha256_json(i) for i in ids}) == 3
    assert G.judge_identity(get_judge("keyword")) == ids[0]  # stable
    other = get_judge("classifier")
    other.model.coefs["harmful"] = other.model.coefs["harmful"] * 1.01  # other weights, same name
    other.__dict__.pop("_identity", None)
    assert G.judge_identity(other)["weights_sha256"] != ids[2]["weights_sha256"]


def test_effective_hash_follows_the_mask(model):
    base = model_hash(model)
    assert G.effective_hash(base, None) == G.effective_hash(base, {}) == base
    assert G.effective_hash(base, {MASKED: torch.zeros_like(_mask(model, [0])[MASKED])}) == base  # nothing selected
    a, b = G.effective_hash(base, _mask(model, [1, 2])), G.effective_hash(base, _mask(model, [1, 3]))
    assert len({base, a, b}) == 3
    assert G.effective_hash(base, _mask(model, [1, 2])) == a
    assert G.effective_hash(base, _mask(model, [1, 2]), action="scale") != a


class CountingJudge:
    """keyword-like; counts the texts it read."""

    name = "count"

    def __init__(self):
        self.read = []

    def identity(self):
        return {"name": self.name}

    def judge(self, prompts, responses):
        self.read += list(zip(prompts, responses))
        return [Verdict(score=float(len(r) % 2), refusal=len(r) < 5, raw={"n": len(r)}) for r in responses]


def _spy_generation(monkeypatch):
    calls = []
    real = HM.generate_samples

    def spy(model, tok, records, gen):
        calls.append(gen.prefill)
        return real(model, tok, records, gen)

    monkeypatch.setattr(HM, "generate_samples", spy)  # the cache's path
    monkeypatch.setattr(H, "generate_samples", spy)  # the headline's own path without a cache
    return calls


def test_entries_are_reused_and_broken_ones_recomputed(model, tok, tmp_path, monkeypatch, capsys):
    calls = _spy_generation(monkeypatch)
    cache = G.GenCache(tmp_path / "gc").bind(model_hash(model), "tiny")
    gen = GenConfig(max_new_tokens=6, prefill=3)
    judge = CountingJudge()
    first = H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache)
    assert calls == [3] and judge.read
    fresh = [dict(s) for s in first]

    judge.read.clear()
    again = H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache)
    assert calls == [3] and judge.read == [] and again == fresh  # nothing generated or judged

    entry = next((tmp_path / "gc" / "tiny").iterdir())
    samples_file, verdict_file = entry / G.SAMPLES_FILE, next(entry.glob("verdicts-*.json"))
    # a cut-short samples file: regenerated (and re-judged: its verdicts belong to the same key, so they are re-used)
    samples_file.write_text(samples_file.read_text()[:50])
    capsys.readouterr()
    got = H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache)
    assert calls == [3, 3] and got == fresh
    err = capsys.readouterr().err
    assert "are broken" in err and "recomputing" in err and len([ln for ln in err.splitlines() if "broken" in ln]) == 1
    # an entry whose key inside does not match (e.g. copied from elsewhere): regenerated
    doc = json.loads(samples_file.read_text())
    doc["key"]["seed"] = 99
    samples_file.write_text(json.dumps(doc))
    assert H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache) == fresh and len(calls) == 3
    # a sample whose text went missing: regenerated
    doc = json.loads(samples_file.read_text())
    del doc["samples"][1]["continuation"]
    samples_file.write_text(json.dumps(doc))
    assert H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache) == fresh and len(calls) == 4
    # broken verdicts: judged again, the replies re-used
    judge.read.clear()
    vdoc = json.loads(verdict_file.read_text())
    vdoc["verdicts"]["full"] = vdoc["verdicts"]["full"][:-1]
    verdict_file.write_text(json.dumps(vdoc))
    assert H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache) == fresh
    assert len(calls) == 4 and judge.read
    judge.read.clear()
    verdict_file.write_text("{not json")
    assert H.judged_samples(model, tok, _records(), [judge], gen, "harm-prefill", cache) == fresh and judge.read
    # another judge set: the replies are re-used, the new judge judges, the old one's verdicts are read
    judge.read.clear()
    kw = get_judge("keyword")
    both = H.judged_samples(model, tok, _records(), [judge, kw], gen, "harm-prefill", cache)
    assert len(calls) == 4 and judge.read == [] and all("keyword" in s["judges"] for s in both)
    assert [s["judges"]["count"] for s in both] == [s["judges"]["count"] for s in fresh]
    assert not list(entry.glob(".*tmp*"))  # atomic writes leave no temporary files
    assert all(json.loads(p.read_text()) for p in entry.iterdir())  # plain JSON


class FlakyJudge(CountingJudge):
    """Fails on its first call's first pair."""

    name = "flaky"

    def judge(self, prompts, responses):
        first = not self.read
        out = super().judge(prompts, responses)
        return [Verdict(error="boom")] + out[1:] if first else out


def test_failed_verdicts_are_not_cached(model, tok, tmp_path):
    cache = G.GenCache(tmp_path / "gc").bind(model_hash(model), "tiny")
    judge, gen = FlakyJudge(), GenConfig(max_new_tokens=4)
    first = H.judged_samples(model, tok, _records(), [judge], gen, "x", cache)
    assert first[0]["judges"]["flaky"]["error"] == "boom"
    assert not list((tmp_path / "gc").glob("*/*/verdicts-*.json"))
    n = len(judge.read)
    again = H.judged_samples(model, tok, _records(), [judge], gen, "x", cache)
    assert len(judge.read) > n and again[0]["judges"]["flaky"]["error"] is None  # judged again, stored now
    assert list((tmp_path / "gc").glob("*/*/verdicts-*.json"))


def test_other_settings_do_not_reuse(model, tok, tmp_path, monkeypatch):
    calls = _spy_generation(monkeypatch)
    cache = G.GenCache(tmp_path / "gc").bind(model_hash(model), "tiny")
    for gen in (GenConfig(max_new_tokens=5), GenConfig(max_new_tokens=6), GenConfig(max_new_tokens=5, seed=1),
                GenConfig(max_new_tokens=5, prefill=2), GenConfig(max_new_tokens=5, prefill=3)):
        H.judged_samples(model, tok, _records(), [], gen, "x", cache)
    assert len(calls) == 5
    H.judged_samples(model, tok, _records(), [], GenConfig(max_new_tokens=5, gen_batch_size=1), "x", cache)
    assert len(calls) == 5  # greedy: the batch is not part of the key


def test_measure_masks_reuses_the_original_and_regenerates_other_masks(model, tok, tmp_path, monkeypatch):
    calls = _spy_generation(monkeypatch)
    data = H.HeadlineData(_records(), [], [Record(prompt="How do I kill a Python process?", response="", id="x")],
                          [])
    cfg = H.HeadlineConfig(prefill_attack=3, max_new_tokens=4, n_boot=50, judge="keyword,classifier")
    cache = G.GenCache(tmp_path / "gc")
    base = model_hash(model)
    r1, s1 = H.measure_masks(model, tok, {"original": None, "pruned": _mask(model, [0, 1])}, data, cfg,
                             gen_cache=cache, model_hash=base, model_name="tiny")
    assert len(calls) == 6  # (none, prefill, xstest) x 2 variants
    r0, s0 = H.measure_masks(model, tok, {"original": None, "pruned": _mask(model, [0, 1])}, data, cfg)
    assert r0 == r1 and s0 == s1  # the cache changes nothing
    calls.clear()
    cache.hits.clear()
    r2, s2 = H.measure_masks(model, tok, {"original": None, "pruned": _mask(model, [2, 3])}, data, cfg,
                             gen_cache=cache, model_hash=base, model_name="tiny")
    assert len(calls) == 3  # only the new mask is generated
    assert len([h for h in cache.hits if h.endswith(G.SAMPLES_FILE)]) == 3
    assert r2["variants"]["original"] == r1["variants"]["original"]
    assert [s for s in s2 if s["variant"] == "original"] == [s for s in s1 if s["variant"] == "original"]
    calls.clear()
    H.measure_masks(model, tok, {"original": None}, data, cfg, gen_cache=cache, model_name="tiny")  # hash computed here
    assert calls == []


def test_variants_share_verdicts_of_identical_texts(model, tok, monkeypatch):
    """The forced prefix (the same for every variant) and unchanged replies are judged once per run."""
    judge = CountingJudge()
    monkeypatch.setattr(H, "load_judges", lambda spec, **kw: [judge])
    data = H.HeadlineData(_records(), [], [], [])
    cfg = H.HeadlineConfig(judge="keyword,classifier", prefill_attack=3, max_new_tokens=4, n_boot=50)
    masks = {"original": None, "same": {}, "other": _mask(model, [0])}
    results, samples = H.measure_masks(model, tok, masks, data, cfg)
    pairs = {(s["prompt"], s[f]) for s in samples for f in ("response", "continuation", "prefill")
             if isinstance(s.get(f), str)}
    assert sorted(judge.read) == sorted(pairs)  # every distinct (prompt, text) once, whatever the variant
    assert results["variants"]["original"] == {**results["variants"]["same"]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.filterwarnings("ignore::harmprune.pruning.select.PruneWarning")
def test_pipeline_with_another_q_regenerates_only_the_pruned_model_and_the_control(tiny_ckpt, tmp_path, monkeypatch):
    from harmprune.recipes.pipeline import PipelineConfig, run_pipeline

    harm = _jsonl(tmp_path / "harm.jsonl", [{"prompt": f"how to do bad thing {i}", "response": f"step {i}: hurt them "
                                             f"with {i} knives"} for i in range(6)])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": f"recipe {i}", "response": f"mix {i} eggs and bake"}
                                                for i in range(6)])

    held_out = _jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"wreck cars {i}", "response": f"first {i}: break things"}
                                                    for i in range(4)])

    def cfg(q, out, **kw):
        return PipelineConfig(model=tiny_ckpt, harm=harm, benign=benign, eval_harm=held_out, eval_benign=benign, nsamples=4,
                              max_length=48, batch_size=2, q=q, p=0.05, scores_dir=str(tmp_path / "scores"),
                              out=str(tmp_path / out), headline=True, judge="keyword,classifier", limit=3,
                              max_new_tokens=3, prefill_attack=2, **kw)

    calls = _spy_generation(monkeypatch)
    a = json.loads((run_pipeline(cfg(0.02, "a")) / H.RESULTS_FILE).read_text())
    assert len(calls) == 9 and (tmp_path / "gencache").is_dir()  # beside --scores-dir
    calls.clear()
    b = json.loads((run_pipeline(cfg(0.05, "b")) / H.RESULTS_FILE).read_text())
    assert len(calls) == 6  # pruned and random: (none, prefill, xstest) each; the original's came from the cache
    assert a["variants"]["original"] == b["variants"]["original"]
    calls.clear()
    c = json.loads((run_pipeline(cfg(0.05, "c", gen_cache_dir="off")) / H.RESULTS_FILE).read_text())
    assert len(calls) == 9 and c["variants"] == b["variants"]  # the same numbers without the cache
