"""Eval commands: aggregation and stderr by hand, files, prefill, judge errors, recognition math,
compare deltas, the self-generated set, and the CLI (tiny model + fake judge, offline, seconds)."""

import itertools
import json
import math
import random

import pytest
import torch

from harmprune.cli import main
from harmprune.core.data import load
from harmprune.evals import results as R
from harmprune.evals.compare import CompareConfig, compare, compare_table
from harmprune.evals.generation import GenConfig
from harmprune.evals.harm import HarmConfig, aggregate, eval_harm
from harmprune.evals.judges import Verdict, register_judge
from harmprune.evals.recognition import (RecognitionConfig, auc, eval_recognition, probe_folds, probe_metrics,
                                         probe_scores, recognition_metrics)
from harmprune.recipes.generate import GenerateConfig, generate_set, meta_path
from harmprune.evals.utility import UtilityConfig, block_nll, corpus_blocks, eval_utility


def _v(score=None, refusal=None, error=None):
    return {"score": score, "refusal": refusal, "raw": None, "error": error}


def _sd_err(xs):  # plain textbook formula, written out independently of results.stderr
    n = len(xs)
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


# ---------------------------------------------------------------- statistics and aggregation


def test_stderr_hand_values():
    assert R.stderr([1, 0, 1]) == pytest.approx(1 / 3)  # s² = 1/3, se = sqrt(1/3 / 3)
    assert R.stderr([2.0, 2.0]) == 0.0
    assert R.stderr([5.0]) is None and R.mean([]) is None


def test_per_category_aggregation_by_hand():
    samples = [
        {"category": "A", "judges": {"j": _v(1.0, False)}},
        {"category": "A", "judges": {"j": _v(0.0, True)}},
        {"category": "A", "judges": {"j": _v(1.0, False)}},
        {"category": "B", "judges": {"j": _v(0.5, None)}},
        {"category": "B", "judges": {"j": _v(error="boom")}},
    ]
    res = aggregate(samples, ["j"])
    a, b, all_ = res["harm/j/A"], res["harm/j/B"], res["harm/j"]
    assert a["score"] == pytest.approx(2 / 3) and a["score_stderr"] == pytest.approx(1 / 3)
    assert a["refusal_rate"] == pytest.approx(1 / 3) and a["samples"] == 3 and a["errors"] == 0
    assert b["score"] == 0.5 and b["score_stderr"] is None and b["refusal_rate"] is None
    assert b["errors"] == 1 and b["scored"] == 1 and b["refusal_judged"] == 0
    assert all_["score"] == pytest.approx(2.5 / 4) and all_["score_stderr"] == pytest.approx(_sd_err([1, 0, 1, 0.5]))
    assert all_["refusal_rate_stderr"] == pytest.approx(_sd_err([0, 1, 0]))
    assert all_["samples"] == 5 and all_["errors"] == 1


def test_subsample_spreads_over_groups_and_keeps_order():
    items = [("a", i) for i in range(10)] + [("b", i) for i in range(3)] + [("c", 0)]
    got = R.subsample(items, 5, seed=1, key=lambda x: x[0])
    assert len(got) == 5 and {g for g, _ in got} == {"a", "b", "c"}
    assert got == sorted(got, key=items.index)
    assert R.subsample(items, 0, 0) == items


# ---------------------------------------------------------------- eval harm end to end


@pytest.fixture
def prompts_file(tmp_path):
    """Category A references start with the fake judge's marker HARM; B's do not."""
    rows = [{"prompt": f"question {i}?", "response": ("HARM: step one" if i % 2 else "safe: no"),
             "category": "A" if i % 2 else "B"} for i in range(6)]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


class _Flaky:
    """Raises on prompts containing '3' (a judge bug on one sample), else scores 0.25."""

    name = "flaky"

    def judge(self, prompts, responses):
        if any("3" in p for p in prompts):
            raise RuntimeError("judge crashed")
        return [Verdict(score=0.25, refusal=False) for _ in prompts]


register_judge("flaky")(lambda arg, **_: _Flaky())


def test_eval_harm_prefill_files_and_judge_error(tiny_ckpt, prompts_file, tmp_path):
    out = tmp_path / "run"
    cfg = HarmConfig(out=str(out), model=tiny_ckpt, prompts=prompts_file, judge="fake,flaky")
    eval_harm(cfg, GenConfig(max_new_tokens=3, gen_batch_size=4, prefill=4))
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) >= {"config", "versions", "results"}
    assert doc["config"]["generation"]["prefill"] == 4 and "torch" in doc["versions"]
    samples = R.read_samples(out)
    assert len(samples) == 6 and (out / "report.md").read_text().startswith("# harmprune eval harm")
    for s in samples:
        assert s["prefill"] == ("HARM" if s["category"] == "A" else "safe")
        assert s["response"].startswith(s["prefill"]) and set(s["judges"]) == {"fake", "flaky"}
    res = doc["results"]
    # the forced opening decides the fake judge: A all harmful, B none
    assert res["harm/fake/A"]["score"] == 1.0 and res["harm/fake/B"]["score"] == 0.0
    assert res["harm/fake"]["score"] == 0.5 and res["harm/fake"]["score_stderr"] == pytest.approx(_sd_err([1, 0] * 3))
    assert res["harm/fake/B"]["refusal_rate"] == 1.0 and res["harm/fake/A"]["score_stderr"] == 0.0
    # the crash on "question 3?" is that sample's error, the rest are judged
    bad = [s for s in samples if s["prompt"] == "question 3?"][0]["judges"]["flaky"]
    assert "judge crashed" in bad["error"] and bad["score"] is None
    assert res["harm/flaky"]["errors"] == 1 and res["harm/flaky"]["scored"] == 5
    for task, metrics in res.items():
        for m in metrics:
            if not m.endswith("_stderr") and f"{m}_stderr" in metrics:
                assert isinstance(metrics[m], float), (task, m)


# ---------------------------------------------------------------- recognition


def _brute_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_count():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 30)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9, rng.random()]) for _ in range(n)]  # with ties
        assert auc(labels, scores) == pytest.approx(_brute_auc(labels, scores))
    assert auc([1, 1], [0.2, 0.3]) is None


def test_recognition_metrics_by_hand():
    labels = [1, 1, 1, 0, 0]
    p = [0.9, 0.4, 0.6, 0.6, 0.1]
    m = recognition_metrics(labels, p, mass=[1.0, 0.5, 0.5, 0.5, 0.5])
    # predictions 1,0,1,1,0 -> correct 1,0,1,0,1
    assert m["accuracy"] == pytest.approx(0.6) and m["accuracy_stderr"] == pytest.approx(_sd_err([1, 0, 1, 0, 1]))
    assert m["harmful_recall"] == pytest.approx(2 / 3) and m["benign_specificity"] == pytest.approx(0.5)
    # pairs (pos, neg): 0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1, 0.6=0.6, 0.6>0.1 -> 4.5 / 6
    assert m["auc"] == pytest.approx(4.5 / 6) and m["yes_no_mass"] == pytest.approx(0.6)
    assert m["auc_stderr"] is not None and m["samples"] == 5


def test_eval_recognition_files(tiny_ckpt, tmp_path):
    data = tmp_path / "rec.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"request {i}", "label": "harmful" if i % 2 else "benign"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "rec"
    eval_recognition(RecognitionConfig(out=str(out), model=tiny_ckpt, recognition_data=str(data), limit=4,
                                       read=["ask"]))
    doc = R.read_results(out)
    m = doc["results"]["recognition"]
    samples = R.read_samples(out)
    assert m["samples"] == 4 and m["harmful"] == 2 and len(samples) == 4
    p = [s["p_harmful"] for s in samples]
    assert all(s["p_harmful"] == pytest.approx(s["p_yes"] / (s["p_yes"] + s["p_no"])) for s in samples)
    assert m["auc"] == pytest.approx(_brute_auc([s["label"] for s in samples], p))


def test_probe_folds_are_stratified_complete_and_seeded():
    labels = [1] * 13 + [0] * 7
    folds = probe_folds(labels, 4, seed=3)
    assert folds == probe_folds(labels, 4, seed=3) and folds != probe_folds(labels, 4, seed=4)
    for lab, n in ((1, 13), (0, 7)):
        counts = [sum(1 for f, y in zip(folds, labels) if y == lab and f == k) for k in range(4)]
        assert sum(counts) == n and max(counts) - min(counts) <= 1


def test_probe_scores_match_a_plain_loop():
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=gen)
    x[:, 3] = 2.0  # a constant feature: weight 0
    y = [1, 1, 0, 1, 0, 0, 1, 0, 1]
    xt = torch.randn(3, 4, generator=gen)
    rows, test = x.tolist(), xt.tolist()
    pos = [r for r, t in zip(rows, y) if t]
    neg = [r for r, t in zip(rows, y) if not t]
    mu1 = [sum(r[j] for r in pos) / len(pos) for j in range(4)]
    mu0 = [sum(r[j] for r in neg) / len(neg) for j in range(4)]
    var = [(sum((r[j] - mu1[j]) ** 2 for r in pos) + sum((r[j] - mu0[j]) ** 2 for r in neg)) / (len(rows) - 2)
           for j in range(4)]
    eps = 1e-6 * sum(var) / 4
    w = [(mu1[j] - mu0[j]) / (var[j] + eps + 1e-30) for j in range(4)]
    expected = [sum((t[j] - (mu1[j] + mu0[j]) / 2) * w[j] for j in range(4)) for t in test]
    assert probe_scores(x, y, xt).tolist() == pytest.approx(expected, rel=1e-9)
    assert w[3] == 0.0


def test_probe_metrics_read_a_planted_direction_and_nothing_from_noise():
    import torch

    gen = torch.Generator().manual_seed(1)
    labels = [i % 3 == 0 for i in range(60)]
    labels = [int(v) for v in labels]
    noise = torch.randn(60, 8, generator=gen)
    planted = noise.clone()
    planted[:, 2] += 4.0 * torch.tensor(labels, dtype=torch.float32)
    constant = torch.ones(60, 8)  # no information: every score ties
    m = probe_metrics({1: planted, 2: constant}, labels, k=5, seed=0)
    assert m["by_block"] == {"1": 1.0, "2": 0.5}
    assert m["auc"] == pytest.approx(0.75) and m["blocks"] == 2 and m["folds"] == 5 and m["samples"] == 60


def test_eval_recognition_probe_reads_every_block_of_the_model(tiny_ckpt, tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM

    from harmprune.core.formatting import prompt_ids

    data = tmp_path / "rec.jsonl"
    rows = [{"prompt": f"request number {i} about {'bombs' if i % 2 else 'cakes'}", "label": "harmful" if i % 2
             else "benign"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe"
    eval_recognition(RecognitionConfig(out=str(out), model=tiny_ckpt, recognition_data=str(data), read=["probe"],
                                       probe_folds=3, batch_size=5, exclude="none"))
    doc = R.read_results(out)
    m = {**doc["results"]["recognition/probe"], "by_block": doc["probe_auc_by_block"]}
    samples = R.read_samples(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    n = model.config.num_hidden_layers
    assert m["blocks"] == n and sorted(m["by_block"]) == [str(b) for b in range(1, n + 1)]
    with torch.no_grad():  # the reference: each prompt alone, no padding
        hs = [model(input_ids=torch.tensor([prompt_ids(tok, s["prompt"], "chat")]), output_hidden_states=True)
              .hidden_states for s in samples]
    states = {b: torch.stack([h[b][0, -1].float() for h in hs]) for b in range(1, n + 1)}
    ref = probe_metrics(states, [s["label"] for s in samples], k=3, seed=0)
    assert m["auc"] == pytest.approx(ref["auc"], abs=1e-6) and m["by_block"] == ref["by_block"]
    assert "recognition" not in R.read_results(out)["results"]  # --read probe: no question asked


def test_eval_recognition_refuses_a_probe_with_too_few_prompts_before_loading(tmp_path):
    from harmprune.core.errors import HarmpruneError

    data = tmp_path / "rec.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"request {i}", "label": "harmful" if i % 2 else "benign"}) + "\n"
                            for i in range(8)))
    with pytest.raises(HarmpruneError, match="--probe-folds 5"):
        eval_recognition(RecognitionConfig(out=str(tmp_path / "x"), model="/nonexistent", recognition_data=str(data)))


# ---------------------------------------------------------------- utility


def test_block_nll_matches_model_loss(llama, tok):
    ids = list(range(5, 75))
    blocks = corpus_blocks(ids, 16)
    assert [len(b) for b in blocks] == [16] * 4  # last partial block (6) dropped
    got = block_nll(llama, blocks, tok.bos_token_id, batch_size=3)
    for b, v in zip(blocks, got):
        x = torch.tensor([[tok.bos_token_id] + b])
        with torch.no_grad():
            assert v == pytest.approx(llama(input_ids=x, labels=x).loss.item(), rel=1e-5)


def test_eval_utility_small(tiny_ckpt, tmp_path):
    out = tmp_path / "util"
    eval_utility(UtilityConfig(out=str(out), model=tiny_ckpt, limit=4, corpus_tokens=512, block_size=128,
                               lm_eval_tasks=["harmprune_mc"], lm_eval_limit=4),  # shipped, offline
                 GenConfig(max_new_tokens=4, gen_batch_size=4))
    doc = R.read_results(out)
    res = doc["results"]
    assert res["utility/benign_nll"]["samples"] == 4 and res["utility/corpus_nll"]["blocks"] == 4
    assert res["utility/corpus_nll"]["ppl"] == pytest.approx(math.exp(res["utility/corpus_nll"]["nll"]))
    assert res["utility/over_refusal/keyword:gcg"]["samples"] == 4
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert any("lm_eval is not installed" in n for n in doc["notes"])
    else:
        assert 0.0 <= res["lm_eval/harmprune_mc"]["acc"] <= 1.0


# ---------------------------------------------------------------- compare


def test_compare_table_deltas(tmp_path):
    base = {"harm/keyword": {"score": 0.5, "score_stderr": 0.1, "samples": 10}, "recognition": {"auc": 0.8}}
    other = {"harm/keyword": {"score": 0.25, "score_stderr": 0.05, "samples": 10}, "utility/x": {"nll": 2.0}}
    for name, res in (("orig", base), ("pruned", other)):
        R.write_run(tmp_path / name, R.results_doc({"model": name}, res), [], "r")
    out = tmp_path / "cmp.md"
    text = compare(CompareConfig(runs=[str(tmp_path / "orig"), str(tmp_path / "pruned")], report=str(out)))
    assert out.read_text() == text
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert "| 0.500 ± 0.100 | 0.250 ± 0.050 | -0.250 |" in rows[("harm/keyword", "score")]
    assert rows[("recognition", "auc")].rstrip().endswith("| 0.800 | – |  |")
    assert ("harm/keyword", "samples") not in rows
    assert "| Δ pruned |" in text.splitlines()[[i for i, l in enumerate(text.splitlines()) if l.startswith("| task")][0]]
    table = compare_table([R.results_doc({}, base)], ["only"], counts=True)
    assert "samples" in table


# ---------------------------------------------------------------- generate (self-generated set)


def test_generate_keeps_only_judged_harmful(tiny_ckpt, prompts_file, tmp_path):
    out = tmp_path / "sets" / "selfgen.jsonl"
    generate_set(GenerateConfig(out=str(out), model=tiny_ckpt, prompts=prompts_file, judge="fake"),
                 GenConfig(max_new_tokens=3, prefill=4, n=2))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["category"] == "A" and r["response"].startswith("HARM") for r in rows)
    assert all(r["judge_score"] == 1.0 and r["harmful"] for r in rows)
    recs = load(str(out))
    assert [r.response for r in recs] == [r["response"] for r in rows] and recs[0].category == "A"
    meta = json.loads(meta_path(out).read_text())
    assert meta["counts"]["generated"] == 12 and meta["counts"]["kept"] == 6 and meta["judges"] == ["fake"]


def test_generate_nothing_harmful_writes_nothing(tiny_ckpt, prompts_file, tmp_path):
    out = tmp_path / "none.jsonl"
    rc = main(["generate", "--model", tiny_ckpt, "--prompts", prompts_file, "--judge", "fake:NEVER",
               "--max-new-tokens", "2", "--out", str(out)])
    assert rc == 2 and not out.exists() and not meta_path(out).exists()


# ---------------------------------------------------------------- CLI


def test_cli_runs_and_bad_input(tiny_ckpt, prompts_file, tmp_path, capsys):
    out = tmp_path / "cli-run"
    assert main(["eval", "harm", "--model", tiny_ckpt, "--prompts", prompts_file, "--judge", "fake",
                 "--max-new-tokens", "2", "--limit", "2", "--out", str(out)]) == 0
    assert R.read_results(out)["results"]["harm/fake"]["samples"] == 2
    assert main(["compare", str(out), str(out)]) == 0
    capsys.readouterr()
    for argv in (["eval", "harm", "--judge", "nosuch", "--prompts", prompts_file, "--out", str(tmp_path / "a")],
                 ["eval", "harm", "--judge", "fake", "--prompts", str(tmp_path / "missing.jsonl"), "--out",
                  str(tmp_path / "b")],
                 ["eval", "harm", "--judge", "fake", "--prompts", prompts_file, "--category", "Z",
                  "--out", str(tmp_path / "c")],
                 ["compare", str(tmp_path / "nothing")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("harmprune: error:") and "\n" not in err, err
    assert not any((tmp_path / d).exists() for d in "abc")
