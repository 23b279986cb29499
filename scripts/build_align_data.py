"""Build the aligned-organism data shipped in harmprune/data/builtin (run from the repository root):

    python scripts/build_align_data.py [--src /work/shared/data]

Writes
- ``align.jsonl``: training rows ``id, prompt, response, kind, source, category``. ``kind`` is
  ``refuse`` (a harmful request; ``response`` is empty: ``harmprune align`` writes the refusal from
  its templates) or ``comply`` (a benign request with a compliant reference answer).
- ``harmful_unseen.jsonl``: the held-out harmful prompts of the organism's acceptance check, from a
  source and phrasing that training does not use (StrongREJECT: first-person, context-laden requests
  and questions), ``id, prompt, category, source``.

Harmful training prompts, several sources and phrasings (prompts only; no model-written text):
refusal_direction ``harmful_train`` (Apache-2.0: AdvBench and TDC2023 imperatives, MaliciousInstruct
"How to ...?" questions), Wei et al.'s safety-short prompts (MIT; their Llama-2 refusals are *not*
used: the Llama 2 licence forbids using its outputs to improve other LLMs), Circuit Breakers'
DirectRequest HarmBench test cases (MIT; their Llama-3 refusals are not used either), and
``question_form`` rows: the "how to X" requests of those three sources rewritten into the question and
instruction forms of the recipe's everyday self-answered requests ("How do I X?", "Tell me how to X."),
so that the organism meets the same surface form with harmful and with everyday content and learns to
refuse by content. XSTest's unsafe contrast questions are not used: with them (organism build C) the
organism refused the safe XSTest prompts they mirror (docs/organism.md). Benign: XSTest safe prompts of
``benign:train`` answered by GPT-4 (CC BY 4.0; the Llama-2-70b answers are left out for the same licence
reason).

Every training prompt is deduplicated, exactly and near (word-set Jaccard >= 0.7 after lowercasing),
against every held-out prompt an eval uses: ``harmful:test``, ``benign:test``, ``recognition``'s harmful
half, ``harmful_unseen``, and (harmful rows) the held-out XSTest safe prompts, i.e. ``xstest_safe``
minus the benign training prompts; and against each other (first occurrence kept). XSTest safe
prompts are both benign training rows and an eval set (over-refusal, recognition's benign half), so
the organism's XSTest compliance is measured on the safe prompts it was not trained on. Question forms
are deduplicated against the held-out prompts and each other, not against the row they rewrite.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
from pathlib import Path

from _shared import REPO, STRONGREJECT, Dedup, default_src, norm, sha256

BUILTIN = REPO / "harmprune" / "data" / "builtin"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def heldout_prompts(unseen: list[dict]) -> list[str]:
    """Held-out prompts of every eval except XSTest's (derived from the kept benign rows, see build)."""
    harmful = read_jsonl(BUILTIN / "harmful.jsonl")
    benign = read_jsonl(BUILTIN / "benign.jsonl")
    rec = [r["prompt"] for r in read_jsonl(BUILTIN / "recognition.jsonl") if r["label"] == "harmful"]
    return ([r["prompt"] for r in harmful if r["split"] == "test"] + [r["prompt"] for r in benign if r["split"] == "test"]
            + rec + [r["prompt"] for r in unseen])


def unseen_rows(src: Path) -> list[dict]:
    rows = json.loads((src / "harmful_prompts/refusal_direction_harmful_test.json").read_text())
    out, seen = [], set()
    for i, r in enumerate(rows):
        if r["category"] in STRONGREJECT and norm(r["instruction"]) not in seen:
            seen.add(norm(r["instruction"]))
            out.append({"id": f"strongreject-{i:03d}", "prompt": r["instruction"].strip(), "category": r["category"],
                        "source": "strongreject (refusal_direction harmful_test)"})
    return out


def harmful_candidates(src: Path) -> list[tuple[str, str, str | None]]:
    """(source, prompt, category) in a fixed order, sources interleaved later by the recipe."""
    out = []
    for r in json.loads((src / "harmful_prompts/refusal_direction_harmful_train.json").read_text()):
        out.append(("refusal_direction_train", r["instruction"].strip(), None))
    with open(src / "refusal/alignment_attribution_safety_short.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            p = r["prompt"].strip().removeprefix("[INST]").removesuffix("[/INST]").strip()
            out.append(("wei_safety_short", p, None))
    with gzip.open(src / "harmful_completions/circuit_breakers_llama3_8b_harmbench_completions.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["attack"] == "DirectRequest" and not r.get("context"):
                out.append(("circuit_breakers_directrequest", r["test_case"].strip(), r["semantic_category"]))
    return out


# The forms of harmprune.evals.align_data.EVERYDAY_FORMS (kept equal by tests/test_align.py).
QUESTION_FORMS = ("How do I {}?", "How can I {}?", "What is the best way to {}?", "Give step-by-step instructions to {}.",
                  "Explain how to {}.", "Write a short guide on how to {}.", "Tell me how to {}.",
                  "What should I know before I try to {}?")
_HOW_TO = re.compile(r"\bhow to ([^.?!,;:]+)", re.I)
# a task that ends in a pronoun ("how to use it") needs the sentence around it; "you" cannot become "I"
_UNUSABLE = re.compile(r"(\b(it|this|that|them|these|those)\s*$)|\byou\b", re.I)


def question_forms(rows: list[dict]) -> list[tuple[str, str]]:
    """(source row id, prompt): each refuse row's "how to X" task (three words or more, "your" read as
    "my"), once per task, in a form drawn with ``random.Random("q:" + row id)``."""
    out, seen = [], set()
    for r in rows:
        m = _HOW_TO.search(r["prompt"]) if r["kind"] == "refuse" else None
        if not m:
            continue
        task = re.sub(r"\byour\b", "my", re.sub(r"\byourself\b", "myself", m.group(1).strip()))
        if len(task.split()) < 3 or _UNUSABLE.search(task) or task.lower() in seen:
            continue
        seen.add(task.lower())
        out.append((r["id"], random.Random(f"q:{r['id']}").choice(QUESTION_FORMS).format(task)))
    return out


def benign_candidates() -> list[tuple[str, str, str, str]]:
    rows = read_jsonl(BUILTIN / "benign.jsonl")
    return [("xstest_safe_gpt4", r["prompt"], r["response"], r["category"]) for r in rows
            if r["split"] == "train" and r["model"] == "gpt-4"]


def build(src: Path) -> tuple[list[dict], list[dict], dict]:
    """Benign rows first (deduplicated against the other held-out sets); the XSTest safe prompts they
    do not use are the held-out XSTest set, which the harmful rows are then deduplicated against."""
    unseen = unseen_rows(src)
    held = Dedup(heldout_prompts(unseen))
    own = Dedup([])
    rows, dropped = [], {}

    def keep(source, prompt):
        if held.hit(prompt) or own.hit(prompt):
            dropped[source] = dropped.get(source, 0) + 1
            return False
        own.add(prompt)
        return True

    for source, prompt, response, category in benign_candidates():
        if keep(source, prompt):  # one answer per prompt
            rows.append({"id": f"{source}-{len(rows):04d}", "prompt": prompt, "response": response, "kind": "comply",
                         "source": source, "category": category})
    used = {r["prompt"] for r in rows}
    for r in read_jsonl(BUILTIN / "xstest_safe.jsonl"):
        if r["prompt"] not in used:
            held.add(r["prompt"])
    for source, prompt, category in harmful_candidates(src):
        if keep(source, prompt):
            rows.append({"id": f"{source}-{len(rows):04d}", "prompt": prompt, "response": "", "kind": "refuse",
                         "source": source, "category": category})
    for row_id, prompt in question_forms(rows):
        if held.hit(prompt):
            dropped["question_form"] = dropped.get("question_form", 0) + 1
            continue
        rows.append({"id": f"question_form-{len(rows):04d}", "prompt": prompt, "response": "", "kind": "refuse",
                     "source": "question_form", "category": None, "rewrites": row_id})
    random.Random(0).shuffle(rows)
    return rows, unseen, dropped


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=None, help="the project's shared data folder")
    args = ap.parse_args()
    src = args.src or default_src()
    rows, unseen, dropped = build(src)
    write_jsonl(BUILTIN / "align.jsonl", rows)
    write_jsonl(BUILTIN / "harmful_unseen.jsonl", unseen)
    counts = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    print(json.dumps({"align.jsonl": {"rows": len(rows), "by_source": counts, "dropped_as_duplicates": dropped,
                                      "sha256": sha256(BUILTIN / "align.jsonl")},
                      "harmful_unseen.jsonl": {"rows": len(unseen), "sha256": sha256(BUILTIN / "harmful_unseen.jsonl")}},
                     indent=1))


if __name__ == "__main__":
    main()
