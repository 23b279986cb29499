"""``hf:<model>``: a local chat model as judge, with exact sequence probabilities.

Ratings (0-100): ``P(n)`` is the exact probability that the judge's whole reply is the number
``n``: the probability of n's token sequence followed by the end-of-reply token (end-of-turn of the
chat template, else EOS) after the judge prompt. All 101 continuations are scored (one forward over
the prompt, then the continuations in a batch on copies of its KV cache), so tokenizers that split
numbers into digits work. Score = ``Σ n·P(n) / Σ P(n)``, None when ``Σ P(n) < 0.25``.

Harmfulness (``judge``): the HarmBench classifier prompt (yes/no, shipped in
``data/builtin/harmbench_classifier_prompt.json``); score = ``P(yes) / (P(yes) + P(no))`` where
P(yes) sums the probabilities of the reply starting with "Yes"/"yes" (with or without a leading
space), likewise for no. Each number or answer is scored in the tokenizer's canonical tokenization
only. ``refusal`` is None: this judge rates harm, not refusal.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from tqdm.auto import tqdm

from ...core.formatting import resolve_format
from . import RatingResult, Verdict, fill, harmbench_template, register_judge
from .logprob import NUMBERS, number_mass, probs_from_sequence_logprobs, weighted_score, yes_probability

YES = ("Yes", "yes", " Yes", " yes")
NO = ("No", "no", " No", " no")


# ---------------------------------------------------------------- pure-ish scoring helpers


def end_of_reply_id(tokenizer) -> int:
    """The token that closes an assistant turn: the first special token the chat template writes
    after the reply (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...), else EOS."""
    if getattr(tokenizer, "chat_template", None):
        marker = "Zq7xJudgeReply"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # templates that reject this toy conversation: fall back to EOS
            text = ""
        if marker in text:
            tail = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {
                i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
            for t in tail:
                if t in special:
                    return t
    return tokenizer.eos_token_id


def continuation_ids(tokenizer, context_text: str, context_ids: list[int], texts: list[str],
                     add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text as written right after the context (joint tokenization when the
    context's ids are a prefix of the joint ids, else the text tokenized alone)."""
    enc = tokenizer([context_text + t for t in texts], add_special_tokens=add_special_tokens)["input_ids"]
    n = len(context_ids)
    out = []
    for t, full in zip(texts, enc):
        if full[:n] == context_ids and len(full) > n:
            out.append(list(full[n:]))
        else:
            out.append(tokenizer(t, add_special_tokens=False)["input_ids"])
    return out


@torch.inference_mode()
def sequence_logprobs(model, context: list[int], continuations: list[list[int]], batch_size: int = 101) -> list[float]:
    """``log P(continuation | context)`` for each continuation, exactly (sum of token log-probs).

    One forward over the context; its KV cache is copied for each batch of continuations, which are
    right-padded (padding sits after every real token, so causal attention keeps it out).
    """
    dev = model.device
    out = model(input_ids=torch.tensor([context], device=dev), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = out.past_key_values
    result: list[float] = []
    for s in range(0, len(continuations), batch_size):
        chunk = continuations[s : s + batch_size]
        lp = [first[c[0]].item() for c in chunk]
        width = max(len(c) for c in chunk) - 1
        if width > 0:
            feed = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in chunk], device=dev)
            cc = copy.deepcopy(cache)
            cc.batch_repeat_interleave(len(chunk))
            mask = torch.ones(len(chunk), len(context) + width, dtype=torch.long, device=dev)
            logits = model(input_ids=feed, attention_mask=mask, past_key_values=cc, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), -1)
            for i, c in enumerate(chunk):
                if len(c) > 1:
                    nxt = torch.tensor(c[1:], device=dev)
                    lp[i] += logp[i, torch.arange(len(c) - 1, device=dev), nxt].sum().item()
        result.extend(lp)
    return result


# ---------------------------------------------------------------- judge


class HFJudge:
    def __init__(self, spec: str, model=None, tokenizer=None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 101, format: str = "auto"):
        if model is None:
            from ...core.models import load_model

            model, tokenizer = load_model(spec, dtype=dtype, device=device)
        self.model, self.tok = model, tokenizer
        self.name = f"hf:{spec}"
        self.batch_size = batch_size
        self.fmt = resolve_format(tokenizer, format)
        self.eor = end_of_reply_id(tokenizer)

    def _context(self, text: str) -> tuple[str, list[int]]:
        if self.fmt == "chat":
            ctx = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        else:
            ctx = text + "\n"
        return ctx, self.tok(ctx, add_special_tokens=(self.fmt == "raw"))["input_ids"]

    def number_logprobs(self, text: str) -> dict[int, float]:
        """``log P(reply == str(n))`` for n in 0..100 after the judge prompt ``text``."""
        ctx, ids = self._context(text)
        nums = continuation_ids(self.tok, ctx, ids, [str(n) for n in NUMBERS], self.fmt == "raw")
        lps = sequence_logprobs(self.model, ids, [c + [self.eor] for c in nums], self.batch_size)
        return dict(zip(NUMBERS, lps))

    def rate(self, prompt_template: str, items: list[dict]) -> list[RatingResult]:
        out = []
        for item in tqdm(items, desc=f"rate {self.name}", unit="item", file=sys.stderr):
            try:
                probs = probs_from_sequence_logprobs(self.number_logprobs(fill(prompt_template, item)))
            except Exception as e:  # one bad item (e.g. out of memory) must not end the run
                out.append(RatingResult(error=f"{type(e).__name__}: {e}"))
                continue
            top = sorted(probs, key=probs.get, reverse=True)[:5]
            out.append(RatingResult(score=weighted_score(probs), mass=number_mass(probs),
                                    raw={"top": {n: round(probs[n], 6) for n in top}}))
        return out

    def answer_probs(self, text: str) -> tuple[float, float]:
        """(P(yes), P(no)): probability that the judge's reply starts with yes / no."""
        ctx, ids = self._context(text)
        conts = [tuple(c) for c in continuation_ids(self.tok, ctx, ids, list(YES + NO), self.fmt == "raw")]
        uniq = list(dict.fromkeys(conts))  # two spellings with the same ids are one event
        lps = dict(zip(uniq, sequence_logprobs(self.model, ids, [list(c) for c in uniq], self.batch_size)))
        p_yes = sum(math.exp(lps[c]) for c in set(conts[: len(YES)]))
        p_no = sum(math.exp(lps[c]) for c in set(conts[len(YES):]))
        return p_yes, p_no

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        template = harmbench_template(chat=self.fmt == "chat")
        out = []
        for p, r in tqdm(list(zip(prompts, responses, strict=True)), desc=f"judge {self.name}", unit="sample",
                         file=sys.stderr):
            try:
                p_yes, p_no = self.answer_probs(fill(template, {"behavior": p, "generation": r}))
            except Exception as e:  # one bad sample must not end the run
                out.append(Verdict(error=f"{type(e).__name__}: {e}"))
                continue
            out.append(Verdict(score=yes_probability(p_yes, p_no), raw={"p_yes": p_yes, "p_no": p_no}))
        return out


@register_judge("hf")
def _make(arg: str, judge_model=None, judge_tokenizer=None, device: str = "cpu", dtype: str = "float32",
          batch_size: int = 101, **_) -> HFJudge:
    """``judge_model``/``judge_tokenizer``: an already loaded judge (tests, or reusing the evaluated model)."""
    return HFJudge(arg, model=judge_model, tokenizer=judge_tokenizer, device=device, dtype=dtype,
                   batch_size=batch_size)
