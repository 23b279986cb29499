"""Generation backends: the vLLM adapter against a recording stub of ``vllm`` (vLLM needs CUDA and
cannot be installed here), ``auto`` selection, and the HF ``--adapter`` path with a real PEFT LoRA."""

import importlib.machinery
import json
import sys
import types

import pytest
import torch

from harmprune.core.errors import HarmpruneError, MissingDependency
from harmprune.core.models import ModelRef, load_model
from harmprune.evals import backends as B
from harmprune.evals.generation import GenConfig, build_inputs, generate, generate_tokens

EOS2 = 9  # a second stop id, only in the checkpoint's generation_config.json


# ---------------------------------------------------------------- a recording vllm stub


class _Rec:
    def __init__(self):
        self.llm_kwargs, self.generate_calls, self.loras = [], [], []


def _stub_vllm(monkeypatch, eos: int):
    """Install a fake ``vllm`` (LLM, SamplingParams, lora.request.LoRARequest) and pretend CUDA exists.

    ``LLM.generate`` answers completion j of prompt i with ``[i+20, j+30, 40, eos, 50]``: the ids
    after EOS must never reach the caller.
    """
    rec = _Rec()

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            rec.llm_kwargs.append(kw)

        def generate(self, prompts, sp, lora_request=None, **kw):
            rec.generate_calls.append({"prompts": prompts, "sp": sp.kw, "lora_request": lora_request})
            outs = []
            for i, _ in enumerate(prompts):
                comps = [types.SimpleNamespace(token_ids=(i + 20, j + 30, 40, eos, 50)) for j in range(sp.kw["n"])]
                outs.append(types.SimpleNamespace(outputs=comps))
            return outs

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.name, self.lora_id, self.path = name, lora_id, path
            rec.loras.append(self)

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() needs one
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    module("vllm", LLM=LLM, SamplingParams=SamplingParams)
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=LoRARequest)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(B, "_ENGINE", {})
    monkeypatch.setattr(B, "_LORA_IDS", {})
    return rec


@pytest.fixture
def ckpt(tiny_ckpt, tok):
    """The tiny checkpoint with two stop ids: the tokenizer's EOS and EOS2 from generation_config.json."""
    from pathlib import Path

    p = Path(tiny_ckpt) / "generation_config.json"
    gc = json.loads(p.read_text()) if p.is_file() else {}
    gc["eos_token_id"] = [tok.eos_token_id, EOS2]
    p.write_text(json.dumps(gc))
    return tiny_ckpt


def _expected(contexts, n, eos_cut_at):
    """What the stub answers, cut at the first stop id, written plainly."""
    out = []
    for i, _ in enumerate(contexts):
        comps = []
        for j in range(n):
            ids = [i + 20, j + 30, 40, eos_cut_at, 50]
            comps.append(ids[: ids.index(eos_cut_at)])
        out.append(comps)
    return out


def test_vllm_backend_maps_settings_and_cuts_at_eos(ckpt, tok, monkeypatch):
    rec = _stub_vllm(monkeypatch, eos=EOS2)  # the stub stops on the generation config's extra EOS
    contexts = [[1, 5, 6, 7], [1, 8], [1, 9, 9, 9, 9]]
    cfg = GenConfig(n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11, backend="vllm")
    backend = B.make_backend("vllm", ModelRef(ckpt, dtype="bf16"), tok)
    out = backend.generate(contexts, cfg)

    assert out == _expected(contexts, 3, EOS2)
    (kw,) = rec.llm_kwargs
    assert kw["model"] == ckpt and kw["tokenizer"] == ckpt and kw["dtype"] == "bfloat16" and kw["seed"] == 11
    assert "enable_lora" not in kw
    (call,) = rec.generate_calls
    assert call["prompts"] == [{"prompt_token_ids": c} for c in contexts]
    assert call["lora_request"] is None
    sp = call["sp"]
    assert (sp["n"], sp["temperature"], sp["top_p"], sp["max_tokens"], sp["seed"]) == (3, 0.7, 0.9, 5, 11)
    assert sp["stop_token_ids"] == sorted({tok.eos_token_id, EOS2})


def test_vllm_greedy_asks_once_and_copies(ckpt, tok, monkeypatch):
    rec = _stub_vllm(monkeypatch, eos=2)
    contexts = [[1, 5], [1, 6, 7]]
    out = B.make_backend("vllm", ModelRef(ckpt), tok).generate(contexts, GenConfig(n=4, max_new_tokens=3))
    sp = rec.generate_calls[0]["sp"]
    assert sp["n"] == 1 and sp["temperature"] == 0 and sp["top_p"] == 1.0
    one = _expected(contexts, 1, 2)
    assert out == [c * 4 for c in one]


def test_vllm_engine_built_once_per_checkpoint(ckpt, tok, tmp_path, monkeypatch):
    from tiny import save_tiny, tiny_llama

    rec = _stub_vllm(monkeypatch, eos=2)
    cfg = GenConfig(max_new_tokens=2)
    for _ in range(2):
        B.make_backend("vllm", ModelRef(ckpt), tok).generate([[1, 5]], cfg)
    assert len(rec.llm_kwargs) == 1 and len(rec.generate_calls) == 2
    other = save_tiny(tmp_path / "other", tiny_llama(tok, seed=1), tok)
    B.make_backend("vllm", ModelRef(other), tok).generate([[1, 5]], cfg)
    assert [k["model"] for k in rec.llm_kwargs] == [ckpt, other]


def test_vllm_end_to_end_text(ckpt, tok, monkeypatch):
    """generate(): the contexts vLLM sees are build_inputs' (prefill included) and the text is decoded."""
    rec = _stub_vllm(monkeypatch, eos=2)
    prompts, refs = ["hi there", "how?"], ["Sure: do this", "No way"]
    cfg = GenConfig(max_new_tokens=4, prefill=3, backend="vllm")
    texts = generate(ModelRef(ckpt), tok, prompts, cfg, prefill_texts=refs)
    contexts, forced = build_inputs(tok, prompts, "chat", refs, 3)
    assert rec.generate_calls[0]["prompts"] == [{"prompt_token_ids": c} for c in contexts]
    exp = _expected(contexts, 1, 2)
    assert texts == [[tok.decode(f + e[0], skip_special_tokens=True)] for f, e in zip(forced, exp)]
    assert texts[0][0].startswith("Sur")


# ---------------------------------------------------------------- auto / errors


def test_auto_falls_back_to_hf(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed (find_spec -> None)
    assert B.resolve_backend("auto") == "hf"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed" in err[0] and "transformers" in err[0]
    with pytest.raises(MissingDependency, match="harmprune\\[vllm\\]"):
        B.resolve_backend("vllm")


def test_auto_without_cuda_falls_back_and_with_cuda_picks_vllm(monkeypatch, capsys):
    _stub_vllm(monkeypatch, eos=2)
    assert B.resolve_backend("auto") == "vllm"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert B.resolve_backend("auto") == "hf"
    assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(MissingDependency, match="CUDA"):
        B.resolve_backend("vllm")


def test_quantized_loading_keeps_hf(monkeypatch, capsys):
    _stub_vllm(monkeypatch, eos=2)
    assert B.resolve_backend("auto", hf_only="--load-in-4bit") == "hf"
    with pytest.raises(HarmpruneError, match="--load-in-4bit"):
        B.resolve_backend("vllm", hf_only="--load-in-4bit")
    with pytest.raises(HarmpruneError, match="unknown generation backend"):
        B.resolve_backend("tgi")


def test_hf_backend_needs_a_loaded_model(ckpt, tok):
    with pytest.raises(HarmpruneError, match="loaded model"):
        B.make_backend("hf", ModelRef(ckpt), tok)


def test_max_lora_rank_rounding():
    assert [B.vllm_max_lora_rank(r) for r in (1, 8, 9, 32, 33, 300, 512)] == [8, 8, 16, 32, 64, 320, 512]
    with pytest.raises(HarmpruneError, match="513"):
        B.vllm_max_lora_rank(513)


# ---------------------------------------------------------------- LoRA adapters (real PEFT)


@pytest.fixture
def lora(tmp_path, tok):
    """A saved tiny checkpoint with large random weights and a real PEFT LoRA adapter (rank 4, non-zero B)
    on full module names, as ``harmprune finetune`` writes them."""
    import peft

    from harmprune.core.targets import select_linears
    from tiny import randomize_matrices, save_tiny, tiny_llama

    base = tiny_llama(tok, seed=3, tie=False)
    g = torch.Generator().manual_seed(0)
    randomize_matrices(base, g)
    ckpt = save_tiny(tmp_path / "base", base, tok)
    names = list(select_linears(base))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, bias="none",
                                                      rank_pattern={names[0]: 12}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(tmp_path / "adapter")
    return ckpt, str(tmp_path / "adapter")


def _merged_by_hand(ckpt, adapter):
    """Base weights + (alpha/r)·B·A per module, read from the adapter file and applied plainly."""
    from safetensors.torch import load_file

    cfg = json.loads(open(f"{adapter}/adapter_config.json").read())
    lora = load_file(f"{adapter}/adapter_model.safetensors")
    model, _ = load_model(ckpt)
    params = dict(model.named_parameters())
    done = 0
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            r = a.shape[0]
            params[f"{module}.weight"] += (cfg["lora_alpha"] / r) * (b @ a)
            done += 1
    assert done == len(cfg["target_modules"])
    return model


def test_hf_adapter_equals_merged_model(lora, tok):
    ckpt, adapter = lora
    with_adapter, _ = load_model(ckpt, adapter=adapter)
    assert type(with_adapter).__name__ == "PeftModel" and load_model(ckpt, adapter=adapter).adapter == adapter
    merged = _merged_by_hand(ckpt, adapter)
    base, _ = load_model(ckpt)
    contexts, _ = build_inputs(tok, ["hello", "a longer prompt, please", "x"], "chat")
    cfg = GenConfig(max_new_tokens=12, gen_batch_size=2)
    got = generate_tokens(with_adapter, tok, contexts, cfg)
    assert got == generate_tokens(merged, tok, contexts, cfg)
    assert got != generate_tokens(base, tok, contexts, cfg)  # the adapter changes the replies
    ids = torch.tensor([contexts[0]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_vllm_adapter_rank_and_lora_request(lora, tok, monkeypatch):
    ckpt, adapter = lora
    rec = _stub_vllm(monkeypatch, eos=2)
    backend = B.make_backend("vllm", ModelRef(ckpt, adapter=adapter), tok)
    for _ in range(2):
        backend.generate([[1, 5]], GenConfig(max_new_tokens=2))
    (kw,) = rec.llm_kwargs
    assert kw["enable_lora"] is True and kw["max_lora_rank"] == 16  # rank_pattern's 12, rounded up for vLLM
    reqs = [c["lora_request"] for c in rec.generate_calls]
    assert all(r is not None for r in reqs) and reqs[0].lora_id == reqs[1].lora_id >= 1
    from pathlib import Path

    assert Path(reqs[0].path) == Path(adapter).resolve()


def test_bad_adapter_dir(tiny_ckpt, tmp_path):
    with pytest.raises(HarmpruneError, match="adapter_config.json"):
        load_model(tiny_ckpt, adapter=str(tmp_path))


# ---------------------------------------------------------------- eval wiring


def test_eval_harm_vllm_never_loads_the_hf_model(ckpt, tmp_path, monkeypatch):
    from harmprune.core import models
    from harmprune.evals import results as R
    from harmprune.evals.harm import HarmConfig, eval_harm

    _stub_vllm(monkeypatch, eos=2)

    def no_load(*a, **k):
        raise AssertionError("the HF model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    rows = [{"prompt": f"question {i}?", "response": "HARM: x", "category": "A"} for i in range(3)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    eval_harm(HarmConfig(out=str(out), model=ckpt, prompts=str(data), judge="fake"),
              GenConfig(max_new_tokens=4, backend="auto"))
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["generation"]["backend"] == "vllm"  # auto resolved and recorded
    m = doc["model"]
    assert m["model_hash"] is None and len(m["checkpoint_hash"]) == 64 and m["class"] == "ModelRef"
    assert len(R.read_samples(out)) == 3


def test_eval_settings_refuse_bad_combinations(tiny_ckpt, tmp_path):
    from harmprune.evals.em import EMConfig
    from harmprune.evals.harm import HarmConfig

    with pytest.raises(HarmpruneError, match="exclude each other"):
        HarmConfig(out=str(tmp_path / "o"), load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(HarmpruneError, match="adapter_config.json"):
        HarmConfig(out=str(tmp_path / "o"), adapter=str(tmp_path))
    with pytest.raises(HarmpruneError, match="adapter_config.json"):
        EMConfig(out=str(tmp_path / "o"), judge="fake", adapter=str(tmp_path))


def test_eval_em_vllm_with_adapter_never_loads_the_hf_model(lora, tmp_path, monkeypatch):
    from harmprune.core import models
    from harmprune.evals import em
    from harmprune.evals import results as R

    ckpt, adapter = lora
    rec = _stub_vllm(monkeypatch, eos=2)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("HF load")))
    out = tmp_path / "em"
    em.eval_em(em.EMConfig(out=str(out), model=ckpt, adapter=adapter, judge="fake", n=2, max_new_tokens=4,
                           limit_questions=2, n_boot=10, backend="vllm"))
    doc = R.read_results(out)
    assert doc["config"]["backend"] == "vllm" and doc["model"]["adapter"]["path"] == adapter
    assert doc["model"]["model_hash"] is None and doc["model"]["checkpoint_hash"]
    assert rec.llm_kwargs[0]["enable_lora"] and all(c["lora_request"] for c in rec.generate_calls)
    assert rec.generate_calls[0]["sp"]["temperature"] == 1.0
