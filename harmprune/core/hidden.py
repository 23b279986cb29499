"""Hidden states of prompts, read through the model's public forward (``output_hidden_states``): a thin shell
shared by the subspace study (``subspace activations``) and ``eval recognition``'s probe."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .formatting import prompt_ids, resolve_format


@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], layers: list[int], fmt: str | None = "auto",
                      batch_size: int = 8, max_length: int = 256) -> dict[int, torch.Tensor]:
    """``{layer: n × d float32 CPU tensor}``: the hidden state at each prompt's last token.

    Batches are left padded, with the attention mask over real tokens and position ids counted
    from each prompt's first real token, so a prompt's states equal those of the prompt alone.
    """
    fmt = resolve_format(tok, fmt)
    ids = [prompt_ids(tok, p, fmt)[-max_length:] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in tqdm(range(0, len(ids), batch_size), desc="hidden states", leave=False):
        chunk = ids[i:i + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        hs = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                   use_cache=False).hidden_states
        for l in layers:
            out[l].append(hs[l][:, -1, :].float().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def model_layers(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None:
        raise ValueError("the model config has no num_hidden_layers")
    return int(n)
