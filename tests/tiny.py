"""Tiny models and a local tokenizer for offline unit tests (built in code, nothing downloaded)."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-free char-level tokenizer: every printable ASCII char is a token (vocab ~105)."""
    chars = list(dict.fromkeys(string.printable))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tok=None, seed: int = 0, layers: int = 2, hidden: int = 32, tie: bool = True) -> LlamaForCausalLM:
    tok = tok or make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(tok=None, seed: int = 0, layers: int = 2, hidden: int = 32) -> Qwen2ForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads; q/k/v have biases."""
    tok = tok or make_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Qwen2ForCausalLM(cfg).eval()


def randomize_matrices(model, gen: torch.Generator, std: float = 0.3) -> None:
    """Redraw every 2-D parameter as N(0, std^2) from ``gen``: the default init of a tiny model gives
    near-uniform logits, so its greedy text barely depends on the prompt."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def save_tiny(path, model=None, tok=None) -> str:
    """Write a tiny model + tokenizer as a loadable HF checkpoint directory; return its path."""
    tok = tok or make_tokenizer()
    model = model or tiny_llama(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def shared_data():
    """The project's shared source data folder (for the build-script tests), or None where it is absent."""
    from pathlib import Path

    for cand in (Path("/work/shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if (cand / "SOURCES.md").exists():
            return cand
    return None
