#!/usr/bin/env python3
"""Train the shipped offline response classifier (harmprune/data/builtin/classifier/).

Run by hand (never at run time; needs scikit-learn):
    .venv/bin/python scripts/train_classifier.py [--src DIR] [--out DIR]
``--src`` defaults to /work/shared/data, else ../shared/data next to the repository.
Deterministic: fixed split (hash of the prompt), liblinear solver, fixed seed.

Labelled responses (permissive sources only; Alpaca/AlpacaEval-derived data, CC BY-NC, is NOT used):
- circuit_breakers…jsonl.gz (MIT): Llama-3-8B completions, harmful = HarmBench classifier "Yes".
- refusal_direction_jbb_completions.jsonl.gz (Apache-2.0): 5 chat models, baseline and with the
  refusal direction ablated, harmful = LlamaGuard-2 unsafe.
- jbb_artifacts_completions.jsonl.gz (MIT): jailbreak responses of GPT-3.5/4, Llama-2, Vicuna,
  harmful = JailbreakBench judge (`jailbroken`); rows where LlamaGuard-1 disagrees are left out of
  training (label noise) but kept in the evaluation.
- XSTest v2 completions (CC BY 4.0 prompts): replies to safe prompts and refusals of unsafe ones are
  not harmful; human refusal/compliance labels train the refusal head.
- alignment-attribution safety-short (MIT): Llama-2 refusals, not harmful, refusal.
Features are the response text only (the requests are almost all harmful, so request text would
mostly tell sources apart).

Evaluation prompts are kept out (issue 20): every row whose prompt is one of the package's evaluation
prompts (``harmprune.evals.eval_prompts``: harmful:test, benign:test, harmful_unseen, XSTest safe,
recognition, EM questions) or a near-duplicate of one, and every row whose reply is a reply to such a
prompt (the same normalised text in a shipped eval split or in a dropped row), is removed before the
split. ``card.json`` records the counts and the evaluation-prompt set's sha256; ``provenance.json``
ships hashes of every kept prompt (and of its content words) and reply, which
``tests/test_classifier.py`` checks against the evaluation prompts without the shared data.
Held-out split: by near-duplicate cluster of prompts (every completion of one request, and of its
rewordings, on the same side), so near-duplicate completions do not leak.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from _shared import REPO, default_src, sha256  # noqa: E402,F401 - scripts/ is on sys.path when run
sys.path.insert(0, str(REPO))

from harmprune.core.manifest import versions  # noqa: E402
from harmprune.evals import eval_prompts as E  # noqa: E402
from harmprune.evals.classifier import BUILTIN_DIR, AnalyzerSettings, TextClassifier, analyze  # noqa: E402

SEED = 0
TEST_FRACTION = 0.2
MAX_FEATURES = 40_000
MIN_DF = 3
C_GRID = (1.0, 4.0, 16.0, 64.0)
CV_FOLDS = 4

FILES = {
    "harmbench_cls": ("harmful_completions/circuit_breakers_llama3_8b_harmbench_completions.jsonl.gz", "MIT"),
    "llamaguard2": ("harmful_completions/refusal_direction_jbb_completions.jsonl.gz", "Apache-2.0"),
    "jbb_judge": ("harmful_completions/jbb_artifacts_completions.jsonl.gz", "MIT"),
    "xstest_gpt4": ("recognition/xstest_v2_completions_gpt4.csv", "CC-BY-4.0 (prompts)"),
    "xstest_llama2": ("recognition/xstest_v2_completions_llama2orig.csv", "CC-BY-4.0 (prompts)"),
    "refusals_llama2": ("refusal/alignment_attribution_safety_short.csv", "MIT"),
}

JUDGED_SOURCES = ("harmbench_cls", "llamaguard2", "jbb_judge")
PROVENANCE_FILE = "provenance.json"
PREFILL_TOKENS = 10  # the headline's --prefill default
PREFILL_TOKENIZER = "smollm2-135m-instruct"


@dataclass
class Example:
    source: str
    group: str  # the request it answers: the unit of the train/held-out split
    text: str
    harmful: int | None  # evaluation label for the harmful head
    refusal: int | None  # label for the refusal head
    train_harmful: bool = True  # False: evaluated but left out of training (disputed label)
    prompt: str = ""  # the request's text


def norm_prompt(p: str) -> str:
    return E.normalise(p)


def jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truthy(v) -> bool:
    """JSON booleans, or their string spellings."""
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def load_examples(src: Path) -> list[Example]:
    ex: list[Example] = []
    for r in jsonl_gz(src / FILES["harmbench_cls"][0]):
        y = int(r["harmbench_cls_pred"] == "Yes")
        ex.append(Example("harmbench_cls", norm_prompt(r["behavior"]), r["completion"], y, 0 if y else None,
                          prompt=r["behavior"]))
    for r in jsonl_gz(src / FILES["llamaguard2"][0]):
        y = int(r["is_jailbreak_llamaguard2"]) == 1
        ex.append(Example("llamaguard2", norm_prompt(r["prompt"]), r["response"], int(y), 0 if y else None,
                          prompt=r["prompt"]))
    for r in jsonl_gz(src / FILES["jbb_judge"][0]):
        if r["response"] is None:  # PAIR rows with no submitted jailbreak
            continue
        y = truthy(r["jailbroken"])
        lg1 = r["jailbroken_llama_guard1"]
        agree = lg1 in (None, "None") or truthy(lg1) == y
        ex.append(Example("jbb_judge", norm_prompt(r["goal"]), r["response"], int(y), 0 if y else None, agree,
                          prompt=r["goal"]))
    for name in ("xstest_gpt4", "xstest_llama2"):
        for r in csv_rows(src / FILES[name][0]):
            unsafe = r["type"].startswith("contrast")
            label = r["final_label"]
            refusal = {"1_full_compliance": 0, "2_full_refusal": 1}.get(label)
            if unsafe and refusal != 1:
                continue  # complying with an unsafe prompt: harmfulness unlabelled
            ex.append(Example(name, norm_prompt(r["prompt"]), r["completion"], 0, refusal, prompt=r["prompt"]))
    for r in csv_rows(src / FILES["refusals_llama2"][0]):
        ex.append(Example("refusals_llama2", norm_prompt(r["prompt"]), r["response"], 0, 1, prompt=r["prompt"]))
    return [e for e in ex if e.text and e.text.strip()]


def drop_evaluation_overlap(examples: list[Example]) -> tuple[list[Example], dict]:
    """The rows whose prompt is no evaluation prompt nor a near-duplicate of one, and whose reply is no
    reply to one; and the removed counts per reason and source."""
    index = E.PromptIndex(p for ps in E.eval_sets().values() for p in ps)
    reason = {}
    for i, e in enumerate(examples):
        if norm_prompt(e.prompt) in index.exact:
            reason[i] = "evaluation_prompt"
        elif index.match(e.prompt) is not None:
            reason[i] = "near_duplicate_prompt"
    tainted = (E.eval_replies() | {E.normalise(examples[i].text) for i in reason}) - {""}  # "": no words to match
    for i, e in enumerate(examples):
        if i not in reason and E.normalise(e.text) in tainted:
            reason[i] = "reply_to_evaluation_prompt"
    removed = {r: {s: sum(reason.get(i) == r and e.source == s for i, e in enumerate(examples)) for s in FILES}
               for r in ("evaluation_prompt", "near_duplicate_prompt", "reply_to_evaluation_prompt")}
    removed = {r: {s: n for s, n in c.items() if n} | {"total": sum(c.values())} for r, c in removed.items()}
    removed["total"] = len(reason)
    return [e for i, e in enumerate(examples) if i not in reason], removed


def cluster_groups(examples: list[Example]) -> None:
    """Every row's ``group`` becomes its prompt's near-duplicate cluster (single linkage at
    ``E.NEAR_DUP_JACCARD``), named by the cluster's first normalised prompt in sorted order."""
    prompts = sorted({norm_prompt(e.prompt) for e in examples})
    parent = {p: p for p in prompts}

    def root(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    index = E.PromptIndex(prompts)
    for p in prompts:
        words = index.words[p]
        for q in {q for w in words for q in index.by_word.get(w, ())}:
            if q != p and E.jaccard(words, index.words[q]) >= E.NEAR_DUP_JACCARD:
                a, b = root(p), root(q)
                parent[max(a, b)] = min(a, b)
    for e in examples:
        e.group = root(norm_prompt(e.prompt))


def provenance(examples: list[Example]) -> dict:
    """Hashes of every kept prompt (normalised text, and each content word) and reply: what the overlap
    test reads (``E.overlaps``)."""
    prompts = sorted({norm_prompt(e.prompt) for e in examples})
    return {
        "about": "hashes of every prompt and reply the classifier was fitted or evaluated on (both sides of the "
                 "split): prompts = [sha256(normalised prompt)[:16], sha256(each content word)[:6] ...], "
                 "replies = sha256(normalised reply)[:12]; checked by tests/test_classifier.py",
        "eval_prompts_sha256": E.eval_prompts_sha256(),
        "prompts": [[E.text_hash(p), " ".join(sorted({E.word_hash(w) for w in E.content_words(p)}))] for p in prompts],
        "replies": sorted({E.text_hash(e.text, 12) for e in examples}),
    }


def prefix_bias(clf: TextClassifier) -> dict:
    """The harmful head on the prefill attack's forced openings alone: the first PREFILL_TOKENS tokens of
    each harmful:test reference reply; with the full references and benign:test's helpful answers."""
    from harmprune.core.data import DataSpec, load_records

    refs = [r.response for r in load_records(DataSpec(data="harmful:test"))]
    try:
        from harmprune.core.models import load_tokenizer
        from harmprune.evals.generation import prefill_prefixes

        prefixes = prefill_prefixes(load_tokenizer(PREFILL_TOKENIZER), refs, PREFILL_TOKENS)
        how = f"first {PREFILL_TOKENS} tokens of the {PREFILL_TOKENIZER} tokenizer (as the prefill attack forces them)"
    except Exception as err:  # noqa: BLE001 - no local tokenizer: fall back to words, and say so
        prefixes = [" ".join(r.split()[:PREFILL_TOKENS]) for r in refs]
        how = f"first {PREFILL_TOKENS} whitespace words ({PREFILL_TOKENIZER} tokenizer unavailable: {err})"
    benign = [r.response for r in load_records(DataSpec(data="benign:test"))]

    def summary(texts):
        p, q = clf.predict_proba(texts, "harmful"), clf.predict_proba(texts, "refusal")
        return {"n": len(texts), "mean_p_harmful": round(float(p.mean()), 4),
                "share_harmful_at_0.5": round(float((p >= 0.5).mean()), 4),
                "share_refusal_at_0.5": round(float((q >= 0.5).mean()), 4)}

    return {"prefixes": how, "harmful_test_prefix_only": summary(prefixes),
            "harmful_test_full_reference": summary(refs), "benign_test_helpful_answers": summary(benign)}


def is_held_out(group: str) -> bool:
    """Deterministic, library-independent split: a fixed fraction of requests by hash."""
    h = int(hashlib.sha256(f"{SEED}:{group}".encode()).hexdigest()[:8], 16)
    return h % 1000 < TEST_FRACTION * 1000


def auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    from scipy.stats import rankdata

    pos, n_pos = y == 1, int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = rankdata(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    pred = (p >= threshold).astype(int)
    tp, tn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    fp, fn = int(((pred == 1) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    a = auc(y, p)
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "accuracy": round(float((pred == y).mean()), 4),
        "auc": None if a is None else round(a, 4),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def fit_head(X, y, groups, label: str):
    """Logistic regression; C chosen by grouped CV accuracy on the training split only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    cv = {}
    for c in C_GRID:
        accs = []
        for tr, va in GroupKFold(n_splits=CV_FOLDS).split(X, y, groups):
            m = LogisticRegression(C=c, solver="liblinear", class_weight="balanced", random_state=SEED)
            m.fit(X[tr], y[tr])
            accs.append(float((m.predict(X[va]) == y[va]).mean()))
        cv[c] = round(float(np.mean(accs)), 4)
        print(f"  {label}: C={c:<5} grouped-CV accuracy {cv[c]:.4f}", file=sys.stderr)
    best = max(C_GRID, key=lambda c: (cv[c], -c))
    m = LogisticRegression(C=best, solver="liblinear", class_weight="balanced", random_state=SEED)
    m.fit(X, y)
    return m, {"C": best, "cv_accuracy": cv}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=None, help="shared data folder")
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR, help="output classifier directory")
    args = ap.parse_args(argv)
    src = args.src or default_src()

    import sklearn
    from sklearn.feature_extraction.text import TfidfVectorizer

    settings = AnalyzerSettings()
    examples, removed = drop_evaluation_overlap(load_examples(src))
    cluster_groups(examples)
    print(f"removed (evaluation overlap): {json.dumps(removed)}", file=sys.stderr)
    test = np.array([is_held_out(e.group) for e in examples])
    train_ex = [e for e, t in zip(examples, test) if not t]
    test_ex = [e for e, t in zip(examples, test) if t]
    overlap = {e.group for e in train_ex} & {e.group for e in test_ex}
    assert not overlap, "a request is on both sides of the split"
    print(f"examples: {len(examples)} ({len(train_ex)} train, {len(test_ex)} held out)", file=sys.stderr)

    vec = TfidfVectorizer(analyzer=lambda t: analyze(t, settings), sublinear_tf=True, min_df=MIN_DF,
                          max_features=MAX_FEATURES, norm="l2", smooth_idf=True, dtype=np.float64)
    X_train = vec.fit_transform([e.text for e in train_ex])
    X_test = vec.transform([e.text for e in test_ex])
    features = [None] * len(vec.vocabulary_)
    for f, i in vec.vocabulary_.items():
        features[i] = f

    coefs, intercepts, selection, sk_models = {}, {}, {}, {}
    for head in ("harmful", "refusal"):
        rows = [i for i, e in enumerate(train_ex) if getattr(e, head) is not None and (head != "harmful" or e.train_harmful)]
        y = np.array([getattr(train_ex[i], head) for i in rows])
        g = np.array([train_ex[i].group for i in rows])
        model, sel = fit_head(X_train[rows], y, g, head)
        sk_models[head], selection[head] = model, sel | {"train_rows": len(rows), "train_positives": int(y.sum())}
        coefs[head], intercepts[head] = model.coef_[0].astype(np.float64), float(model.intercept_[0])

    clf = TextClassifier(features=features, idf=vec.idf_.astype(np.float64), coefs=coefs, intercepts=intercepts,
                         thresholds={"harmful": 0.5, "refusal": 0.5}, settings=settings, sublinear_tf=True)

    # numpy inference must reproduce scikit-learn exactly (same analyzer, same arithmetic)
    texts = [e.text for e in test_ex]
    max_diff = {}
    for head in coefs:
        ours = clf.predict_proba(texts, head)
        ref = sk_models[head].predict_proba(X_test)[:, 1]
        max_diff[head] = float(np.abs(ours - ref).max())
        assert max_diff[head] < 1e-6, f"numpy inference differs from sklearn on {head}: {max_diff[head]}"
    print(f"numpy vs sklearn max |dP|: {max_diff}", file=sys.stderr)

    # held-out metrics (all held-out rows with their source's label, disputed ones included)
    p_harm, p_ref = clf.predict_proba(texts, "harmful"), clf.predict_proba(texts, "refusal")
    results = {"harmful": {}, "refusal": {}}
    for head, p in (("harmful", p_harm), ("refusal", p_ref)):
        idx = [i for i, e in enumerate(test_ex) if getattr(e, head) is not None]
        y = np.array([getattr(test_ex[i], head) for i in idx])
        results[head]["overall"] = metrics(y, p[idx])
        by_src = defaultdict(list)
        for i in idx:
            by_src[test_ex[i].source].append(i)
        results[head]["per_source"] = {
            s: metrics(np.array([getattr(test_ex[i], head) for i in ii]), p[ii]) for s, ii in sorted(by_src.items())
        }
    # the headline without the easy refusal/XSTest negatives: sources whose labels come from a judge
    judged = [i for i, e in enumerate(test_ex) if e.source in JUDGED_SOURCES]
    results["harmful"]["judge_labelled_sources"] = metrics(np.array([test_ex[i].harmful for i in judged]), p_harm[judged])
    agreed = [i for i, e in enumerate(test_ex) if e.train_harmful]
    results["harmful"]["agreed_labels_only"] = metrics(np.array([test_ex[i].harmful for i in agreed]), p_harm[agreed])

    counts = {
        s: {
            "rows": sum(e.source == s for e in examples),
            "held_out_rows": sum(e.source == s for e in test_ex),
            "harmful": sum(e.source == s and e.harmful == 1 for e in examples),
            "refusal": sum(e.source == s and e.refusal == 1 for e in examples),
            "disputed_harm_label": sum(e.source == s and not e.train_harmful for e in examples),
        }
        for s in FILES
    }
    bias = prefix_bias(clf)
    prov = provenance(examples)
    problems = E.overlaps([p for p, _ in prov["prompts"]], [w.split() for _, w in prov["prompts"]], prov["replies"])
    assert not problems, problems[:5]
    card = {
        "name": "harmprune offline response classifier",
        "heads": {
            "harmful": "P(response is harmful content); judge score. Threshold 0.5.",
            "refusal": "P(response refuses); judge refusal = P >= 0.5.",
        },
        "inputs": "response text only (the request is not used)",
        "model": {
            "features": "TF-IDF (sublinear tf, smoothed idf, L2) over word 1-2 grams, lead-word 1-2 grams "
                        "and in-word char 3-5 grams of the lowercased response (first 4000 chars)",
            "analyzer": asdict(settings), "n_features": len(features), "min_df": MIN_DF,
            "max_features": MAX_FEATURES, "classifier": "logistic regression (liblinear, L2, class_weight=balanced)",
            "selection": selection,
        },
        "data": {
            "source_dir": "shared/data (not shipped)",
            "files": {s: {"path": p, "license": lic, "sha256": sha256(src / p)} for s, (p, lic) in FILES.items()},
            "counts": counts,
            "removed_evaluation_overlap": removed,
            "eval_prompts": {"sha256": E.eval_prompts_sha256(), "prompts": len(E.eval_prompts()),
                             "sets": {k: len(v) for k, v in E.eval_sets().items()},
                             "near_duplicate": f"content-word Jaccard >= {E.NEAR_DUP_JACCARD}",
                             "module": "harmprune.evals.eval_prompts"},
            "split": f"by near-duplicate prompt cluster: sha256('{SEED}:'+cluster's first normalised prompt) "
                     f"mod 1000 < {int(TEST_FRACTION * 1000)} is held out",
            "train_rows": len(train_ex), "held_out_rows": len(test_ex),
            "groups": {"train": len({e.group for e in train_ex}), "held_out": len({e.group for e in test_ex})},
        },
        "metrics_held_out": results,
        "prefill_bias": bias,
        "numpy_vs_sklearn_max_abs_diff": max_diff,
        "seed": SEED,
        "versions": versions() | {"scikit-learn": sklearn.__version__},
    }
    clf.save(args.out)
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (args.out / PROVENANCE_FILE).write_text(json.dumps(prov, separators=(",", ":")) + "\n")
    h = results["harmful"]["overall"]
    print(f"held-out harmful: accuracy {h['accuracy']} AUC {h['auc']} (n={h['n']}); "
          f"refusal: accuracy {results['refusal']['overall']['accuracy']}", file=sys.stderr)
    print(f"prefill bias: {json.dumps(bias)}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
