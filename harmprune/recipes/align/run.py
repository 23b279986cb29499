"""``harmprune align``: safety-tune a causal LM into an aligned model organism.

The model learns to refuse harmful requests (several sources and phrasings, refusals written from
templates, ``evals.align_data``) and to answer benign ones: XSTest safe prompts with compliant answers,
so it does not learn to refuse everything that sounds sensitive, and everyday requests phrased like
the harmful ones, answered by the model itself before training (``--self-n``). Training is
``harmprune.finetune``: full fine-tuning by default, LoRA (merged into the weights) with ``--lora``.
Deterministic: the same settings and seed give the same weights (``weights_sha256`` in
``align_config.json``) on the same software and thread count.

Output ``DIR``: a plain Hugging Face checkpoint (``from_pretrained(DIR)`` loads it), its tokenizer,
``align_data.jsonl`` (the exact training rows, refusals included) and ``align_config.json``
(settings, data hashes and counts, the fine-tune report, weights sha256, versions, wall time).

The alias ``smollm2-135m-aligned`` is :func:`build_alias`: this recipe with its defaults on the
embedded SmolLM2-135M-Instruct, built once into the user cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...core import manifest
from ...core.errors import HarmpruneError
from ...core.options import LoraOptions, ModelOptions, OutputOptions, SeedOptions, TrainStepOptions, pick
from ...core.settings import check, opt, to_dict
from ...core.data import Record
from ...evals.align_data import everyday_prompts, load_rows, training_records, trim_answer

CONFIG_FILE = "align_config.json"
DATA_FILE = "align_data.jsonl"
ALIAS_BASE = "smollm2-135m-instruct"


# The recipe of the embedded model's organism (the smollm2-135m-aligned alias, docs/organism.md):
# `make align` and build_alias pass these; the flags' own defaults are the shared fine-tuning ones.
ORGANISM = {"lr": 1e-4, "train_batch_size": 4, "grad_accum": 2, "train_max_length": 112, "refuse_n": 200}


@dataclass(kw_only=True)
class AlignConfig(ModelOptions, OutputOptions, SeedOptions, TrainStepOptions, LoraOptions):
    """Settings of ``harmprune align``: a full fine-tune by default (``--lora``: LoRA merged into the
    weights); ``--seed`` seeds the data subset, the refusal wording, the data order and LoRA init. The
    organism of the ``smollm2-135m-aligned`` alias uses ``ORGANISM`` (``make align``)."""

    align_data: str = opt("builtin", help="training rows (builtin = shipped align.jsonl; else a JSONL file with "
                                          "prompt, kind refuse|comply, response for comply rows)", role="input")
    refuse_n: int = opt(160, help="harmful requests to train refusals on, spread over sources (0 = all)", range=">= 0")
    comply_n: int = opt(0, help="benign requests with compliant answers, spread over sources (0 = all)", range=">= 0")
    self_n: int = opt(64, help="everyday requests answered by the model itself before training (0 = none)", range=">= 0")
    self_tokens: int = opt(64, help="new tokens per self-written answer (cut back to the last full sentence)", range=">= 1")
    lora: bool = opt(False, help="LoRA (merged into the saved weights) instead of full fine-tuning")

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        check(self.refuse_n >= 0 and self.comply_n >= 0 and self.self_n >= 0,
              "--refuse-n, --comply-n and --self-n must be >= 0")
        check(self.self_tokens >= 1, "--self-tokens must be >= 1")


def weights_sha256(directory: str | Path) -> str:
    """sha256 over the checkpoint's ``*.safetensors`` files (sorted by name, mask excluded)."""
    h = hashlib.sha256()
    for f in sorted(Path(directory).glob("*.safetensors")):
        if f.name != "mask.safetensors":
            h.update(f.name.encode())
            h.update(manifest.sha256_file(f).encode())
    return h.hexdigest()


def _write_records(path: Path, records) -> None:
    path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response,
                                        "source": r.category}, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def _finetune_config(cfg: AlignConfig, data: Path, out: Path):
    from ...finetune.train import FinetuneConfig

    return pick(FinetuneConfig, cfg, train_data=str(data), out=str(out), full=not cfg.lora, merge=cfg.lora,
                format="auto", prompt_field="prompt", response_field="response", save_steps=0, overwrite=True)


def self_answers(cfg: AlignConfig) -> list[Record]:
    """Everyday requests with the model's own greedy answers: they keep its helpful behaviour on
    ordinary requests phrased like harmful ones (no third-party text, any model)."""
    from ...core.models import load_model
    from ...evals.generation import GenConfig, generate

    prompts = everyday_prompts(cfg.self_n, cfg.seed)
    if not prompts:
        return []
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    replies = generate(model, tok, prompts, GenConfig(max_new_tokens=cfg.self_tokens, gen_batch_size=16, seed=cfg.seed))
    out = []
    for i, (p, (r,)) in enumerate(zip(prompts, replies)):
        truncated = len(tok(r, add_special_tokens=False)["input_ids"]) >= cfg.self_tokens - 1
        answer = trim_answer(r, truncated)
        if answer:
            out.append(Record(prompt=p, response=answer, category="self_everyday", id=f"self-{i:03d}"))
    del model
    return out


def run_align(cfg: AlignConfig) -> Path:
    """Safety-tune ``cfg.model`` and write the organism to ``cfg.out``; returns ``cfg.out``."""
    from ...finetune.train import finetune

    t0 = time.perf_counter()
    manifest.check_out_dir(cfg.out, cfg.overwrite)
    rows, raw = load_rows(cfg.align_data)
    records = training_records(rows, cfg.refuse_n, cfg.comply_n, cfg.seed)
    kinds = {k: sum(r["kind"] == k for r in rows if r["id"] in {x.id for x in records}) for k in ("refuse", "comply")}
    manifest.banner("align", {**to_dict(cfg), "records": f"{kinds['refuse']} refuse, {kinds['comply']} comply, "
                                                         f"up to {cfg.self_n} self-answered"})
    records += self_answers(cfg)
    kinds["self"] = len(records) - kinds["refuse"] - kinds["comply"]
    with manifest.work_dir("harmprune-align") as work:  # a SIGKILLed run's is removed at the next start
        _write_records(work / DATA_FILE, records)
        try:
            ft_out = finetune(_finetune_config(cfg, work / DATA_FILE, work / "ft"))
        except HarmpruneError as e:  # it names the temporary data file, gone when this ends
            raise HarmpruneError(str(e).replace(str(work / DATA_FILE), f"the align data ({cfg.align_data})")) from None
        ckpt = ft_out / "merged" if cfg.lora else ft_out
        report = manifest.read_json(ft_out / "finetune_config.json")
        with manifest.atomic_dir(cfg.out, overwrite=True) as tmp:
            for f in ckpt.iterdir():
                if f.is_file() and f.name != "finetune_config.json":
                    shutil.copyfile(f, tmp / f.name)
            shutil.copyfile(work / DATA_FILE, tmp / DATA_FILE)
            manifest.write_json(tmp / CONFIG_FILE, {
                "config": to_dict(cfg), "weights_sha256": weights_sha256(tmp),
                "data": {"spec": cfg.align_data, "sha256": hashlib.sha256(raw).hexdigest(), "rows": len(rows),
                         "records": len(records), **kinds,
                         "records_sha256": manifest.sha256_file(work / DATA_FILE)},
                "finetune": {k: report[k] for k in ("mode", "steps", "final_loss", "mean_loss", "losses", "model",
                                                    "wall_seconds") if k in report},
                "versions": manifest.versions(), "wall_seconds": round(time.perf_counter() - t0, 3)})
    print(f"harmprune: aligned organism written to {cfg.out}", file=sys.stderr)
    return Path(cfg.out)


def build_alias(target: Path) -> None:
    """Builder of the ``smollm2-135m-aligned`` alias (core.models loads it by its dotted name): this
    recipe with the ``ORGANISM`` settings on the embedded model, on one torch thread, written to ``target``."""
    import torch

    print(f"harmprune: building the aligned organism of {ALIAS_BASE} into {target} (once; a CPU fine-tune of "
          "some minutes)", file=sys.stderr)
    # one thread: float sums then add up in the order of the measured organism (docs/organism.md), so every
    # first use gives its weights bit for bit (on a busy 2-core CPU one thread was also the faster)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_align(AlignConfig(out=str(target), model=ALIAS_BASE, **ORGANISM))
    finally:
        torch.set_num_threads(threads)
