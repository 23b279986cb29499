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
