"""Turn records into token ids with response-only loss labels, and batch them.

Contract (docs/design.md): the prompt is everything before the response; its labels are -100 and the
loss is on response tokens only. ``chat`` renders the prompt with the tokenizer's chat template and
generation prompt, and the response ends with EOS. ``raw`` is ``prompt + "\\n" + response`` with no
template (B-TAP's pretrained format). Over-long sequences lose the end of the response, never the
prompt; a record left with no response token is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Record
from .errors import HarmpruneError

IGNORE = -100
FORMATS = ("chat", "raw")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    index: int  # position of the source record


@dataclass
class EncodedSet:
    items: list[Encoded]
    skipped: int
    tokens: int  # response (loss) tokens over all items


def resolve_format(tokenizer, fmt: str | None) -> str:
    """``None``/``auto`` picks ``chat`` when the tokenizer has a chat template, else ``raw``."""
    if fmt in (None, "auto"):
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    if fmt not in FORMATS:
        raise HarmpruneError(f"unknown format {fmt!r}; choose chat, raw or auto")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise HarmpruneError("--format chat needs a tokenizer with a chat template; use --format raw")
    return fmt


def prompt_text(tokenizer, prompt: str, fmt: str, system: str | None = None) -> str:
    """The text the model sees before its reply (also what generation starts from).

    A ``system`` message goes to the chat template; the raw format has no place for it and ignores it.
    """
    if fmt == "chat":
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # e.g. Gemma's template rejects the system role
            if system is None:
                raise
            raise HarmpruneError(f"the chat template does not accept a system message: {e}") from None
    return prompt + "\n"


def prompt_ids(tokenizer, prompt: str, fmt: str, system: str | None = None) -> list[int]:
    text = prompt_text(tokenizer, prompt, fmt, system)
    # A chat template writes its own special tokens; raw text gets the tokenizer's usual BOS.
    return tokenizer(text, add_special_tokens=(fmt == "raw"))["input_ids"]


def encode_record(tokenizer, rec: Record, fmt: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one record, or None when no response token fits."""
    p = prompt_ids(tokenizer, rec.prompt, fmt, rec.system)
    r = tokenizer(rec.response, add_special_tokens=False)["input_ids"]
    if fmt == "chat" and tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    r = r[: max(0, max_length - len(p))]
    if not r:
        return None
    return p + r, [IGNORE] * len(p) + r


def encode(records: list[Record], tokenizer, fmt: str, max_length: int) -> EncodedSet:
    items, skipped = [], 0
    for i, rec in enumerate(records):
        enc = encode_record(tokenizer, rec, fmt, max_length)
        if enc is None:
            skipped += 1
            continue
        items.append(Encoded(enc[0], enc[1], i))
    return EncodedSet(items, skipped, sum(sum(l != IGNORE for l in e.labels) for e in items))


def collate(items: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest item: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in items)
    ids, mask, labels = [], [], []
    for e in items:
        pad = width - len(e.input_ids)
        left = padding_side == "left"
        ids.append(([pad_id] * pad if left else []) + e.input_ids + ([] if left else [pad_id] * pad))
        mask.append(([0] * pad if left else []) + [1] * len(e.input_ids) + ([] if left else [0] * pad))
        labels.append(([IGNORE] * pad if left else []) + e.labels + ([] if left else [IGNORE] * pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def batches(items: list[Encoded], batch_size: int, pad_id: int, padding_side: str = "right"):
    """Yield collated batches in order."""
    for i in range(0, len(items), batch_size):
        yield collate(items[i : i + batch_size], pad_id, padding_side)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one response NLL of the project: ``(nll, mask)``, both (batch, length - 1).

    ``nll[b, t]`` = -log p(label[t+1] | tokens <= t) in float32 on response tokens, 0 elsewhere
    (position t predicts label t+1; labels are aligned with input_ids, as in transformers, and
    ``IGNORE`` marks prompt and padding). Scoring, fine-tuning and evaluation all reduce this.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return tok * mask, mask


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over each sample's response tokens: shape (batch,), float32.

    ``L(x)`` of docs/design.md; summing it over the batch gives the loss whose gradient is Σ_x ∇L(x).
    """
    tok, mask = token_nll(logits, labels)
    return tok.sum(1) / mask.sum(1).clamp_min(1)
