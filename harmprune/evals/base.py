"""What every eval command shares: its settings (``EvalBase``) and how the evaluated model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import manifest, validate
from ..core.models import model_name, quantize_option
from ..core.options import AdapterOptions, DeviceMapOptions, ModelOptions, OutputOptions, QuantizeOptions
from ..core.settings import check
from .backends import resolve_backend


@dataclass(kw_only=True)
class EvalBase(ModelOptions, DeviceMapOptions, QuantizeOptions, AdapterOptions, OutputOptions):
    """Settings every eval command shares (``--out`` is required)."""

    def __post_init__(self):
        check(bool(self.out), "--out is required")
        check(not (self.load_in_8bit and self.load_in_4bit), "--load-in-8bit and --load-in-4bit exclude each other")
        check(self.adapter is None or Path(self.adapter, "adapter_config.json").is_file(),
              f"--adapter {self.adapter}: not a PEFT adapter directory (no adapter_config.json)")
        validate.check_device(self.device, allow_auto=True)


def eval_quantize(base) -> str | None:
    """``"8bit"``/``"4bit"``/None from a settings object's ``load_in_8bit``/``load_in_4bit`` (absent = None)."""
    return quantize_option(getattr(base, "load_in_8bit", False), getattr(base, "load_in_4bit", False))


def eval_backend(requested: str, base) -> str:
    """The concrete generation backend; bitsandbytes loading keeps generation on transformers.

    Also checks the quantization request (CUDA, bitsandbytes, no .gguf) so it fails before any load."""
    from ..core.models import check_quantize, resolve_device

    q = eval_quantize(base)
    if q:
        device = resolve_device(base.device)
        check_quantize(q, base.model if base.model.endswith(".gguf") else None, device,
                       getattr(base, "device_map", None))
    return resolve_backend(requested, hf_only=f"--load-in-{q}" if q else None)


def load_eval_model(base: EvalBase, backend: str = "hf"):
    """``(model, tokenizer, info)`` of the evaluated model (with ``base.adapter``, quantized as asked).

    With a backend that loads the checkpoint itself (vllm) the HF model is not loaded: ``model`` is a
    ``ModelRef`` and ``info`` has a ``checkpoint_hash`` of the weight files instead of ``model_hash``.
    """
    from ..core.models import ModelRef, checkpoint_hash, load_model, load_tokenizer

    adapter, quantize = getattr(base, "adapter", None), eval_quantize(base)
    info = {"spec": base.model, "name": model_name(base.model), "dtype": base.dtype}
    if adapter:
        info["adapter"] = {"path": adapter, "sha256": manifest.sha256_file(Path(adapter, "adapter_config.json"))}
        weights = Path(adapter, "adapter_model.safetensors")
        info["adapter"]["weights_sha256"] = manifest.sha256_file(weights) if weights.is_file() else None
    if quantize:
        info["quantize"] = quantize
    if backend != "hf":
        ref = ModelRef(base.model, adapter, base.dtype, quantize)
        return ref, load_tokenizer(base.model), {**info, "class": type(ref).__name__, "model_hash": None,
                                                 "checkpoint_hash": checkpoint_hash(base.model)}
    handle = load_model(base.model, base.dtype, base.device, getattr(base, "device_map", None), quantize=quantize,
                        adapter=adapter)
    return handle.model, handle.tokenizer, {**info, "class": type(handle.model).__name__, "model_hash": handle.hash}


def short_hash(minfo: dict) -> str:
    return (minfo.get("model_hash") or minfo.get("checkpoint_hash") or "n/a")[:12]
