"""Generation engine: batched, left-padded, KV-cached, greedy by default; optional prefill attack.

Contract: ``generate(model, tok, prompts, cfg)`` returns ``n`` completions per prompt, in the
prompts' order. Greedy (``temperature == 0``) output does not depend on the batch size: batching
is an optimisation only. Sampling is reproducible for a given (seed, prompts, batch_size) and does
not touch the caller's global RNG. A completion stops at the first end-of-sequence token; special
tokens and padding are stripped.

Backends (``cfg.backend``: hf, vllm, auto) sit behind the protocol in :mod:`.backends`; ``model`` is
a loaded HF model, or a ``core.models.ModelRef`` when the backend loads the checkpoint itself.

Prefill attack (``cfg.prefill = K``): the first K tokens of a reference reply (usually a harmful
completion) are appended after the generation prompt and the model continues from there. The
returned completion *includes* that forced text, so judges see the whole reply;
:func:`prefill_prefixes` gives the forced text alone for the record and :func:`generate_parts` the
continuation alone (decoded from the new token ids).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import HarmpruneError
from ..core.formatting import prompt_text, resolve_format
from ..core.options import BackendOptions, FormatOptions, SamplingOptions, SeedOptions, check_sampling
from ..core.settings import check, check_min, opt
from . import backends as B
from .backends import generate_tokens  # noqa: F401 (public name of this module too)

BACKENDS = tuple(B.backend_names())  # hf, vllm, auto


@dataclass(kw_only=True)
class GenConfig(SamplingOptions, FormatOptions, SeedOptions, BackendOptions):
    """How replies are generated (``seed`` seeds sampling)."""

    prefill: int = opt(0, help="force the first K tokens of the reference response as the start of the reply", range=">= 0")

    def __post_init__(self):
        check_sampling(self)
        check_min(self, 0, "prefill")
        check(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------- inputs


def _context_text(tokenizer, prompt: str, fmt: str, system: str | None) -> str:
    # the raw format has no place for a system prompt (core.formatting drops it): here it leads the text
    if system and fmt != "chat":
        return system + "\n\n" + prompt_text(tokenizer, prompt, fmt)
    return prompt_text(tokenizer, prompt, fmt, system or None)


def prefill_ids(tokenizer, reference: str, k: int) -> list[int]:
    """The first ``k`` tokens of ``reference`` as the model would write them in its reply."""
    return tokenizer(reference, add_special_tokens=False)["input_ids"][:k] if k else []


def prefill_prefixes(tokenizer, references: list[str], k: int) -> list[str]:
    """The forced reply openings (text of the first ``k`` tokens of each reference)."""
    return [tokenizer.decode(prefill_ids(tokenizer, r, k), skip_special_tokens=True) for r in references]


def build_inputs(tokenizer, prompts: list[str], fmt: str, prefill_texts: list[str] | None = None,
                 k: int = 0, system: list | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt: (context token ids incl. forced prefill, the forced prefill ids alone)."""
    if k and prefill_texts is None:
        raise HarmpruneError("--prefill needs reference responses (prompts with a response field)")
    if prefill_texts is not None and len(prefill_texts) != len(prompts):
        raise HarmpruneError(f"{len(prefill_texts)} prefill texts for {len(prompts)} prompts")
    if system is not None and len(system) != len(prompts):
        raise HarmpruneError(f"{len(system)} system prompts for {len(prompts)} prompts")
    contexts, forced = [], []
    for i, p in enumerate(prompts):
        text = _context_text(tokenizer, p, fmt, system[i] if system else None)
        # A chat template writes its own special tokens; raw text gets the tokenizer's usual BOS.
        ids = tokenizer(text, add_special_tokens=(fmt == "raw"))["input_ids"]
        pre = prefill_ids(tokenizer, prefill_texts[i], k) if k else []
        contexts.append(ids + pre)
        forced.append(pre)
    return contexts, forced


def check_context(model, contexts: list[list[int]], prompts: list[str]) -> None:
    """Before generating: prompts longer than the model's context (``max_position_embeddings``) are
    refused in one line quoting the first (the model would only produce noise past it)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int):
        return  # a backend that loads the model itself checks its own context
    over = [i for i, c in enumerate(contexts) if len(c) > n]
    if over:
        i = over[0]
        raise HarmpruneError(f"{len(over)} of {len(contexts)} prompts are longer than the model's context of {n} "
                             f"tokens (max_position_embeddings), the first {len(contexts[i])} tokens: "
                             f"{prompts[i][:60]!r}...; shorten or drop them")


# ---------------------------------------------------------------- API


def generate_ids(model, tokenizer, prompts: list[str], cfg: GenConfig, prefill_texts: list[str] | None = None,
                 system: list | None = None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(forced prefill ids per prompt, ``cfg.n`` lists of newly generated ids per prompt)."""
    fmt = resolve_format(tokenizer, cfg.format)
    contexts, forced = build_inputs(tokenizer, prompts, fmt, prefill_texts, cfg.prefill, system)
    check_context(model, contexts, prompts)
    return forced, B.make_backend(cfg.backend, model, tokenizer).generate(contexts, cfg)


def decode_reply(tokenizer, forced: list[int], new: list[int]) -> tuple[str, str]:
    """(the whole reply = forced prefill + continuation, the continuation alone): each decoded from its
    own token ids, never by cutting strings, so the continuation is exactly what the model wrote."""
    return (tokenizer.decode(forced + new, skip_special_tokens=True),
            tokenizer.decode(new, skip_special_tokens=True))


def generate_parts(model, tokenizer, prompts: list[str], cfg: GenConfig, prefill_texts: list[str] | None = None,
                   system: list | None = None) -> list[list[tuple[str, str]]]:
    """``cfg.n`` ``(reply, continuation)`` pairs per prompt (:func:`decode_reply`), in the prompts' order."""
    forced, new = generate_ids(model, tokenizer, prompts, cfg, prefill_texts, system)
    return [[decode_reply(tokenizer, f, c) for c in cs] for f, cs in zip(forced, new)]


def generate(model, tokenizer, prompts: list[str], cfg: GenConfig, prefill_texts: list[str] | None = None,
             system: list | None = None) -> list[list[str]]:
    """``cfg.n`` completions per prompt (forced prefill text included), in the prompts' order.

    ``prefill_texts[i]``: reference reply for prompt i (needed when ``cfg.prefill > 0``).
    ``system[i]``: optional system prompt for prompt i (None entries allowed).
    """
    return [[full for full, _ in rs] for rs in generate_parts(model, tokenizer, prompts, cfg, prefill_texts, system)]
