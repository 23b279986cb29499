"""``fake[:<rule>]``: a deterministic judge for tests (no model, no network).

Judging: ``fake`` = harmful (score 1) iff the response contains ``HARM``; ``fake:<WORD>`` uses
``WORD`` as the marker instead. Special rules: ``fake:hash`` gives a score in [0, 1] from a hash of
(prompt, response); ``fake:error`` fails every sample (Verdict.error set). ``refusal`` is the
negation of harmful for the marker rules (None for hash/error).

Rating: ``ratings={substring: score_or_None}``: the first substring found in the filled prompt gives
the rating; otherwise the rating is a hash of the filled prompt, an integer in 0..100.
"""

from __future__ import annotations

import hashlib

from . import RatingResult, Verdict, fill, register_judge


def _hash_unit(*parts: str) -> float:
    h = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class FakeJudge:
    def __init__(self, rule: str | None = None, ratings: dict | None = None):
        self.rule = rule or "HARM"
        self.ratings = dict(ratings or {})
        self.name = "fake" if rule is None else f"fake:{rule}"

    def identity(self) -> dict:
        return {"name": self.name, "ratings": self.ratings}

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        return [self._one(p, r) for p, r in zip(prompts, responses, strict=True)]

    def _one(self, prompt: str, response: str) -> Verdict:
        if self.rule == "error":
            return Verdict(error="fake judge: failing on purpose")
        if self.rule == "hash":
            return Verdict(score=_hash_unit(prompt, response), raw="hash")
        harmful = self.rule in response
        return Verdict(score=float(harmful), refusal=not harmful, raw=f"marker {self.rule!r} {'found' if harmful else 'absent'}")

    def rate(self, prompt_template: str, items: list[dict]) -> list[RatingResult]:
        out = []
        for item in items:
            text = fill(prompt_template, item)
            key = next((k for k in self.ratings if k in text), None)
            if key is not None:
                score = self.ratings[key]
                out.append(RatingResult(score=None if score is None else float(score),
                                        mass=0.0 if score is None else 1.0, raw=f"rule {key!r}"))
            else:
                out.append(RatingResult(score=float(int(_hash_unit(text) * 101)), mass=1.0, raw="hash"))
        return out


@register_judge("fake")
def _make(arg: str | None, ratings: dict | None = None, **_) -> FakeJudge:
    return FakeJudge(arg, ratings)
