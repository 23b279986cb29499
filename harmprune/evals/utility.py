"""``harmprune eval utility``: does the (pruned) model keep its general abilities?

Parts (``--parts``), each a task in results.json:
- ``utility/benign_nll``: token-weighted mean NLL (nats/token, lower = better) and perplexity of the
  held-out benign completions (``benign:test``), response tokens only; ``sample_nll`` ± stderr is
  the mean over samples of each sample's mean NLL.
- ``utility/corpus_nll``: NLL/perplexity of a plain-text corpus (default: the shipped ``corpus.txt``,
  Python Language Reference prose, PSF License), cut into equal blocks of ``--block-size`` tokens
  (each after BOS when the tokenizer has one; a last partial block is dropped), ``nll_stderr``
  over blocks.
- ``utility/over_refusal/<judge>`` (and ``/<category>``): refusal rate on XSTest's 250 safe prompts
  (higher = more over-refusal). Default judge ``keyword:gcg``: the refusal substrings without the
  "< 20 words = refusal" rule, which would count short helpful answers to XSTest's short questions
  as refusals. Substring rules still over-count replies that merely contain "illegal" etc.; add
  ``classifier`` (its refusal head) for a second opinion.
- ``lm_eval/<task>``: zero-shot tasks (``--lm-eval-tasks``) through lm-eval's ``HFLM`` on the
  already loaded model (handed over in memory, never re-loaded by name), only when ``lm_eval`` is
  installed (``pip install 'harmprune[lmeval]'``); otherwise skipped with a note in results.json and
  report.md. Besides lm-eval's own tasks (which download their data), ``harmprune_mc`` ships with
  harmprune (40 general-knowledge questions, offline): a smoke check that needs no network.
  samples.jsonl gets one row per document (per-choice loglikelihoods, per-doc metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data as builtin_data
from ..core import manifest
from ..core.data import DataSpec
from ..core.errors import DataError, HarmpruneError
from ..core.formatting import IGNORE, token_nll
from ..core.options import (CorpusOptions, EvalBenignOptions, JudgeOptions, LimitOptions, PassOptions, PresetOptions,
                            check_pass)
from ..core.settings import check, check_min, opt
from . import results as R
from .generation import GenConfig
from .harm import (EvalBase, aggregate, eval_backend, generate_samples, judge_options, judge_samples, judge_specs,
                   load_judges, load_prompts)
from .eval_prompts import prompts_of, xstest_heldout
from .nll import response_nll
from .tasks import TASKS, Outcome, Prepared, register_task, run_eval

PARTS = ("benign_nll", "corpus_nll", "over_refusal", "lm_eval")


# ---------------------------------------------------------------- corpus NLL


def corpus_blocks(ids: list[int], block_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Equal blocks of ``block_size`` token ids from the first ``max_tokens`` (0 = all); the last
    partial block is dropped unless it is the only one."""
    if max_tokens:
        ids = ids[:max_tokens]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()
    return [b for b in blocks if len(b) >= 2 or blocks == [b]]


@torch.no_grad()
def block_nll(model, blocks: list[list[int]], bos: int | None, batch_size: int = 8) -> list[float]:
    """Mean NLL (nats/token) of each block: every token predicted from the ones before it (and BOS;
    without BOS the first token has no context and is not scored)."""
    dev = next(model.parameters()).device
    out: list[float] = []
    for s in tqdm(range(0, len(blocks), batch_size), desc="corpus nll", unit="batch", file=sys.stderr):
        chunk = [([bos] if bos is not None else []) + b for b in blocks[s : s + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunk], device=dev)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk], device=dev)
        tok, scored = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids.masked_fill(mask == 0, IGNORE))
        out += (tok.sum(1) / scored.sum(1).clamp_min(1)).tolist()
    return out


def corpus_metrics(per_block: list[float], tokens: int) -> dict:
    nll = R.mean(per_block)
    return {"nll": nll, "nll_stderr": R.stderr(per_block), "ppl": math.exp(nll) if nll is not None else None,
            "tokens": tokens, "blocks": len(per_block)}


def read_corpus(spec: str) -> tuple[str, dict]:
    path = builtin_data.path("corpus.txt") if spec == "builtin" else Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{spec}: no such corpus file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{spec}: not UTF-8 at byte {e.start}") from None
    if not text.strip():
        raise DataError(f"{spec}: empty corpus")
    return text, {"spec": spec, "sha256": manifest.sha256_file(path), "chars": len(text)}


# ---------------------------------------------------------------- lm-eval


def lm_eval_metrics(raw: dict) -> dict:
    """lm-eval's ``results`` ({task: {"acc,none": v, "acc_stderr,none": se, "alias": ...}}) as our
    ``{lm_eval/<task>: {acc: v, acc_stderr: se}}`` (non-"none" filters kept as ``metric[filter]``)."""
    out = {}
    for task, metrics in raw.items():
        row = {}
        for key, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            name, _, filt = key.partition(",")
            if filt and filt != "none":
                base, stderr = (name[: -len("_stderr")], "_stderr") if name.endswith("_stderr") else (name, "")
                name = f"{base}[{filt}]{stderr}"
            row[name] = float(v)
        out[f"lm_eval/{task}"] = row
    return out


LM_EVAL_TASKS_DIR = "lm_eval"  # under data/builtin: task YAMLs shipped with harmprune (harmprune_mc)


def shipped_lm_eval_tasks() -> list[str]:
    """Names of the lm-eval tasks shipped with harmprune (one YAML each, named after its task)."""
    return sorted(p.stem for p in builtin_data.path(LM_EVAL_TASKS_DIR).glob("*.yaml"))


@functools.lru_cache(maxsize=2)
def _task_manager(defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(builtin_data.path(LM_EVAL_TASKS_DIR)), include_defaults=defaults)


def lm_eval_task_manager(tasks: list[str]):
    """lm-eval's TaskManager that also finds the task YAMLs shipped in ``data/builtin/lm_eval``.

    When every requested task is a shipped one, lm-eval's own ~thousands of task configs are not
    indexed (that takes tens of seconds, once per process: the check step's index is the run's);
    otherwise both are, the shipped folder taking precedence. Nothing here touches the network: a
    shipped task reads its rows from a file beside its YAML.
    """
    tm = _task_manager(False)
    return tm if all(t in tm.all_tasks for t in tasks) else _task_manager(True)


LM_EVAL_MISSING = "lm_eval is not installed (pip install 'harmprune[lmeval]')"


def checked_task_manager(tasks: list[str]):
    """The TaskManager of ``tasks`` (None when lm_eval is not installed); an unknown name is one line.
    Needs no model: the check step calls it before anything loads."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    tm = lm_eval_task_manager(tasks)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise HarmpruneError(f"unknown lm-eval task(s) {', '.join(unknown)} in --lm-eval-tasks (shipped: "
                             f"{', '.join(shipped_lm_eval_tasks())}; see `lm_eval ls tasks`)")
    return tm


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def lm_eval_samples(samples: dict) -> list[dict]:
    """lm-eval's logged samples as samples.jsonl rows: task, doc id, target, the filtered responses
    (for multiple-choice tasks: ``[loglikelihood, is_greedy]`` per choice) and the per-doc metrics."""
    rows = []
    for task, docs in samples.items():
        for s in docs:
            metrics = {k: v for k, v in s.items() if k in s.get("metrics", ()) and isinstance(v, (int, float))}
            rows.append({"part": "lm_eval", "task": task, "doc_id": s.get("doc_id"), "target": _jsonable(s.get("target")),
                         "responses": _jsonable(s.get("filtered_resps")), **metrics})
    return rows


def run_lm_eval(model, tok, tasks: list[str], limit: int, batch_size: int, seed: int = 0) -> tuple[dict, list[dict], str | None]:
    """(metrics, sample rows, note): lm-eval zero-shot on ``model`` as it is in memory (pruned,
    masked or with an adapter: it is handed to ``HFLM(pretrained=model)``, never re-loaded by name),
    or ({}, [], why it was skipped)."""
    if not tasks:
        return {}, [], None
    tm = checked_task_manager(tasks)
    if tm is None:
        return {}, [], f"lm-eval tasks {', '.join(tasks)} skipped: {LM_EVAL_MISSING}"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    try:
        res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit or None, task_manager=tm,
                              log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    except ConnectionError as e:  # lm-eval's own tasks fetch their data from the Hub
        raise HarmpruneError(f"lm-eval tasks {', '.join(tasks)}: their data could not be downloaded "
                             f"({str(e).splitlines()[0]}); offline, only the shipped tasks run: "
                             f"{', '.join(shipped_lm_eval_tasks())}") from None
    return lm_eval_metrics(res.get("results", {})), lm_eval_samples(res.get("samples", {})), None


# ---------------------------------------------------------------- the command


@dataclass(kw_only=True)
class UtilityConfig(EvalBase, LimitOptions, JudgeOptions, PassOptions, EvalBenignOptions, PresetOptions, CorpusOptions):
    """Settings of ``harmprune eval utility`` (generation settings for over-refusal: GenConfig; NLL passes:
    ``--max-length`` and ``--batch-size``)."""

    parts: list[str] = opt(list(PARTS), help="parts to run: benign_nll corpus_nll over_refusal lm_eval")
    corpus: str = opt("builtin", help="plain-text UTF-8 corpus file for perplexity (builtin = shipped corpus.txt)", role="input")
    block_size: int = opt(256, help="tokens per corpus block", range=">= 2")
    refusal_prompts: str = opt("xstest", help="safe prompts for over-refusal: xstest = the shipped XSTest safe prompts "
                                              "that no shipped training or protect row uses (the headline's set: the "
                                              "organism trained on, and `benign` holds, most of the others), xstest-all "
                                              "= all 250, or a data file", role="input")
    refusal_judge: str = opt("keyword:gcg", help="refusal judge(s), comma-separated (e.g. keyword:gcg,classifier)")
    lm_eval_tasks: list[str] = opt([], help="lm-eval zero-shot tasks (needs lm_eval: pip install 'harmprune[lmeval]')")
    lm_eval_limit: int = opt(0, help="lm-eval examples per task (0 = all)", range=">= 0")

    def __post_init__(self):
        super().__post_init__()
        bad = [p for p in self.parts if p not in PARTS]
        check(not bad, f"unknown --parts {', '.join(bad)}; choose from {', '.join(PARTS)}")
        check(not self.lm_eval_tasks or "lm_eval" in self.parts, f"--lm-eval-tasks {' '.join(self.lm_eval_tasks)} "
              f"would not run: --parts {' '.join(self.parts)} omits lm_eval; add it or leave --lm-eval-tasks out")
        check_min(self, 0, "corpus_tokens", "limit", "lm_eval_limit")
        check_min(self, 2, "block_size")
        check_pass(self)
        judge_specs(self.refusal_judge)


@register_task
class UtilityTask:
    name, title = "utility", "does the (pruned) model keep its general abilities"

    def prepare(self, cfg: UtilityConfig, gen: GenConfig) -> Prepared:
        check(gen.prefill == 0, "--prefill does not apply to eval utility")
        parts = set(cfg.parts)
        state = {"parts": parts, "judges": load_judges(cfg.refusal_judge, **judge_options(cfg))
                 if "over_refusal" in parts else []}
        data = {}
        if "benign_nll" in parts:
            state["benign"], data["benign"] = load_prompts(DataSpec(data=cfg.eval_benign), cfg.limit, gen.seed, True)
        if "corpus_nll" in parts:
            state["text"], data["corpus"] = read_corpus(cfg.corpus)
        if "over_refusal" in parts:
            xstest = str(builtin_data.path("xstest_safe.jsonl"))
            spec = DataSpec(data=xstest if cfg.refusal_prompts.startswith("xstest") else cfg.refusal_prompts)
            state["safe"], data["refusal_prompts"] = load_prompts(spec, cfg.limit, gen.seed, False)
            if cfg.refusal_prompts == "xstest":  # held out of align.jsonl and of the benign protect set
                rows = xstest_heldout(exclude=prompts_of("benign"))
                state["safe"] = R.draw_distinct(rows, cfg.limit, gen.seed, key=lambda r: r.category)
                data["refusal_prompts"].update(selected=len(state["safe"]), distinct_prompts=len(state["safe"]),
                                               held_out=len(rows))
            data["refusal_prompts"]["name"] = cfg.refusal_prompts
            # NLL needs the HF model anyway; only the over-refusal replies use the backend
            gen = dataclasses.replace(gen, backend=eval_backend(gen.backend, cfg))
        return Prepared(data, state, gen)

    def run(self, load, cfg: UtilityConfig, prep: Prepared) -> Outcome:
        model, tok, minfo = load()
        st, gen, notes, samples, results = prep.state, prep.gen, [], [], {}
        if "benign_nll" in st["parts"]:
            r = response_nll(model, tok, st["benign"], fmt=gen.format, max_length=cfg.max_length,
                             batch_size=cfg.batch_size, desc="benign nll")
            results["utility/benign_nll"] = {"nll": r["nll"], "ppl": r["ppl"],
                                             **R.summarize(r["per_sample"], "sample_nll"), "tokens": r["tokens"],
                                             "samples": r["samples"], "skipped": r["skipped"]}
        if "corpus_nll" in st["parts"]:
            ids = tok(st["text"], add_special_tokens=False)["input_ids"]
            blocks = corpus_blocks(ids, cfg.block_size, cfg.corpus_tokens)
            per_block = block_nll(model, blocks, tok.bos_token_id, cfg.batch_size)
            results["utility/corpus_nll"] = corpus_metrics(per_block, sum(len(b) for b in blocks))
            prep.data["corpus"]["tokens_available"] = len(ids)
            samples += [{"part": "corpus_nll", "block": i, "tokens": len(b), "nll": v}
                        for i, (b, v) in enumerate(zip(blocks, per_block))]
        if "over_refusal" in st["parts"]:
            gsamples = generate_samples(model, tok, st["safe"], gen)
            judge_samples(gsamples, st["judges"])
            names = [j.name for j in st["judges"]]
            for k, m in aggregate(gsamples, names, task="utility/over_refusal").items():
                results[k] = {key: m[key] for key in ("refusal_rate", "refusal_rate_stderr", "samples",
                                                      "refusal_judged", "errors")}
            samples += [{"part": "over_refusal", **s} for s in gsamples]
            notes.append(f"over-refusal judges: {', '.join(names)}; XSTest safe prompts, max_new_tokens "
                         f"{gen.max_new_tokens}")
        if "lm_eval" in st["parts"]:
            lm, lm_samples, note = run_lm_eval(model, tok, cfg.lm_eval_tasks, cfg.lm_eval_limit, cfg.batch_size,
                                               gen.seed)
            results.update(lm)
            samples += lm_samples
            if note:
                notes.append(note)
                print(f"harmprune: {note}", file=sys.stderr)
        if not results:
            raise HarmpruneError("nothing was evaluated: check --parts (lm_eval needs --lm-eval-tasks)")
        return Outcome(results, samples, minfo, notes, R.results_table(results), table_depth=2)


def eval_utility(cfg: UtilityConfig, gen: GenConfig) -> Path:
    """Run ``eval utility``; return the run directory."""
    return run_eval(TASKS["utility"], cfg, gen)
