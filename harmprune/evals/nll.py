"""Mean response NLL (nats per response token): the cheap, judge-free effect measure of pruning."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.data import Record
from ..core.errors import HarmpruneError
from ..core.formatting import batches, encode, resolve_format, token_nll


@torch.no_grad()
def response_nll(model, tokenizer, records: list[Record], *, fmt: str | None = None, max_length: int = 256,
                 batch_size: int = 8, desc: str = "nll") -> dict:
    """Token-weighted mean NLL over the response tokens of ``records`` (prompt tokens excluded).

    Returns ``{"nll": nats/token, "ppl": exp(nll), "tokens": n, "samples": used, "skipped": k,
    "per_sample": [mean NLL of each used record]}``. Higher NLL = the model is less likely to
    produce these responses.
    """
    fmt = resolve_format(tokenizer, fmt)
    enc = encode(records, tokenizer, fmt, max_length)
    if records and not enc.items:  # an NLL over nothing would print 0.0000 as if measured
        raise HarmpruneError(f"{desc}: none of the {len(records)} records keeps a response token within "
                             f"--max-length {max_length} (the prompt fills it); raise --max-length")
    device = next(model.parameters()).device
    total, count, per_sample = 0.0, 0, []
    nb = (len(enc.items) + batch_size - 1) // batch_size
    for batch in tqdm(batches(enc.items, batch_size, tokenizer.pad_token_id), total=nb, desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tok, mask = token_nll(logits, batch["labels"])
        total += tok.sum().item()
        count += int(mask.sum())
        per_sample += (tok.sum(1) / mask.sum(1).clamp_min(1)).tolist()
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": float(torch.tensor(nll).exp()), "tokens": count, "samples": len(enc.items),
            "skipped": enc.skipped, "per_sample": per_sample}


def nll_pair(model, tok, harm_rows, benign_rows, s) -> tuple[dict, dict]:
    """``response_nll`` of the held-out harmful and benign rows (settings ``s``: format, max length, batch)."""
    kw = dict(fmt=s.format, max_length=s.max_length, batch_size=max(8, s.batch_size))
    return (response_nll(model, tok, harm_rows, desc="nll harmful", **kw),
            response_nll(model, tok, benign_rows, desc="nll benign", **kw))


def nll_row(model, tok, harm_rows, benign_rows, s) -> dict:
    h, b = nll_pair(model, tok, harm_rows, benign_rows, s)
    return {"harmful_nll": h["nll"], "benign_nll": b["nll"]}


def specificity(d_harmful: float, d_benign: float) -> float:
    """Harm-specificity Δharmful / Δbenign (inf when only the harmful NLL rose, nan when neither did)."""
    return d_harmful / d_benign if d_benign > 0 else (float("inf") if d_harmful > 0 else float("nan"))


def with_deltas(row: dict, base: dict) -> dict:
    """Add NLL increases over ``base`` (nats/token) and harm-specificity = Δharmful / Δbenign."""
    dh, db = row["harmful_nll"] - base["harmful_nll"], row["benign_nll"] - base["benign_nll"]
    return {**row, "d_harmful": dh, "d_benign": db, "benign_rel": db / base["benign_nll"],
            "specificity": specificity(dh, db)}
