"""Formatting against hand-computed token ids with the char-level tiny tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
import torch.nn.functional as F
from tiny import SPECIALS, make_tokenizer

from harmprune.core.data import Record
from harmprune.core.errors import HarmpruneError
from harmprune.core.formatting import (IGNORE, Encoded, batches, collate, encode, encode_record, per_sample_nll,
                                       prompt_text, resolve_format)

# The tiny vocabulary, written out: special tokens first, then one id per printable character.
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(string.printable)))}
START, END, PAD = VOCAB["<|im_start|>"], VOCAB["<|im_end|>"], VOCAB["<pad>"]


def chars(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def chat_prompt(prompt: str, system: str | None = None) -> list[int]:
    sys_turn = [START] + chars("system\n" + system) + [END] + chars("\n") if system is not None else []
    return sys_turn + [START] + chars("user\n" + prompt) + [END] + chars("\n") + [START] + chars("assistant\n")


def test_resolve_format():
    assert resolve_format(make_tokenizer(), None) == "chat"
    assert resolve_format(make_tokenizer(), "auto") == "chat"
    assert resolve_format(make_tokenizer(chat=False), None) == "raw"
    assert resolve_format(make_tokenizer(), "raw") == "raw"
    with pytest.raises(HarmpruneError):
        resolve_format(make_tokenizer(chat=False), "chat")
    with pytest.raises(HarmpruneError):
        resolve_format(make_tokenizer(), "alpaca")


def test_chat_labels_cover_response_and_eos_only(tok):
    ids, labels = encode_record(tok, Record("hi", "ok"), "chat", 512)
    p = chat_prompt("hi")
    assert ids == p + chars("ok") + [END]
    assert labels == [IGNORE] * len(p) + chars("ok") + [END]


def test_raw_text_has_no_template_and_no_eos(tok):
    ids, labels = encode_record(tok, Record("hi", "ok"), "raw", 512)
    assert ids == chars("hi\nok")
    assert labels == [IGNORE] * 3 + chars("ok")
    assert prompt_text(tok, "hi", "raw") == "hi\n"


def test_system_message_goes_to_the_chat_template(tok):
    assert prompt_text(tok, "hi", "chat", system="Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids, labels = encode_record(tok, Record("hi", "ok", system="Be kind."), "chat", 512)
    p = chat_prompt("hi", "Be kind.")
    assert ids == p + chars("ok") + [END] and labels[: len(p)] == [IGNORE] * len(p)
    assert encode_record(tok, Record("hi", "ok", system="S"), "raw", 512) == encode_record(tok, Record("hi", "ok"),
                                                                                           "raw", 512)


def test_truncation_cuts_the_response_end_never_the_prompt(tok):
    p = chat_prompt("hi")
    ids, labels = encode_record(tok, Record("hi", "abcdef"), "chat", len(p) + 3)
    assert ids == p + chars("abc")  # EOS and "def" cut, prompt intact
    assert labels == [IGNORE] * len(p) + chars("abc")
    ids, _ = encode_record(tok, Record("hi", "abcdef"), "raw", 5)
    assert ids == chars("hi\nab")


def test_record_whose_prompt_fills_max_length_is_skipped_and_counted(tok):
    p = len(chat_prompt("hi"))
    recs = [Record("hi", "ok"), Record("a much longer prompt than the others", "ok"), Record("hi", "yes")]
    assert encode_record(tok, recs[1], "chat", p + 2) is None
    enc = encode(recs, tok, "chat", p + 2)
    assert enc.skipped == 1
    assert [e.index for e in enc.items] == [0, 2]
    assert enc.tokens == 2 + 2  # "ok"+EOS, "ye" (truncated)
    assert encode([Record("hi", "ok")], tok, "chat", p).skipped == 1  # prompt exactly fills max_length


def test_collate_right_and_left_padding():
    items = [Encoded([5, 6, 7], [IGNORE, 6, 7], 0), Encoded([8], [8], 1)]
    right = collate(items, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    left = collate(items, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]
    got = list(batches(items * 3, 4, pad_id=0))
    assert [b["input_ids"].shape[0] for b in got] == [4, 2]


def test_encoded_batch_labels_are_ignore_on_prompt_and_padding(tok):
    enc = encode([Record("hi", "ok"), Record("hello there", "x")], tok, "chat", 512)
    batch = collate(enc.items, PAD)
    for row, (ids, labels, mask) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
        n = len(enc.items[row].input_ids)
        p = len(chat_prompt(["hi", "hello there"][row]))
        assert (labels[:p] == IGNORE).all() and (labels[n:] == IGNORE).all()
        assert labels[p:n].tolist() == ids[p:n].tolist()
        assert mask.sum().item() == n


@pytest.mark.parametrize("side", ["right", "left"])
def test_per_sample_nll_matches_a_plain_loop(side):
    torch.manual_seed(0)
    items = [Encoded([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5], 0),
             Encoded([6, 7, 8], [IGNORE, 7, 8], 1),
             Encoded([9, 1, 2, 3], [IGNORE, IGNORE, IGNORE, 3], 2)]
    batch = collate(items, pad_id=0, padding_side=side)
    logits = torch.randn(*batch["input_ids"].shape, 11, dtype=torch.float64)
    got = per_sample_nll(logits, batch["labels"])
    assert got.dtype == torch.float32 and got.shape == (3,)
    for b, item in enumerate(items):
        offset = batch["input_ids"].shape[1] - len(item.input_ids) if side == "left" else 0
        losses = []
        for t in range(1, len(item.labels)):
            if item.labels[t] != IGNORE:  # logits at position t-1 predict token t
                row = logits[b, offset + t - 1].float()
                losses.append(F.cross_entropy(row[None], torch.tensor([item.labels[t]])))
        assert torch.allclose(got[b], torch.stack(losses).mean(), atol=1e-6)
