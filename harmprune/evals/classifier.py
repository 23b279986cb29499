"""The shipped offline response classifier: TF-IDF text features + logistic-regression heads.

Inference is plain numpy (no scikit-learn, no pickle). A model is two files in one directory:
``classifier.json`` (analyzer settings, feature strings in index order, head intercepts and
thresholds) and ``weights.safetensors`` (``idf`` and one ``coef.<head>`` vector per head).
``scripts/train_classifier.py`` fits it with scikit-learn, using :func:`analyze` below as the
vectorizer's analyzer, so training and inference tokenize identically by construction.

Heads of the shipped model (score direction: higher = more of the named property):
- ``harmful``: P(the response is harmful content), learnt from HarmBench-classifier, LlamaGuard and
  JailbreakBench-judge labels.
- ``refusal``: P(the response refuses), learnt from XSTest human labels and refusal corpora.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import data as builtin_data
from ..core.errors import DataError

BUILTIN_DIR = builtin_data.path("classifier")
CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class AnalyzerSettings:
    """How a text becomes feature strings (all lowercased, whitespace collapsed)."""

    max_chars: int = 4000  # long replies are cut: the opening carries most of the signal
    word_ngrams: tuple[int, int] = (1, 2)  # "w:" features over word and punctuation tokens
    char_ngrams: tuple[int, int] = (3, 5)  # "c:" features inside space-padded words
    lead_words: int = 8  # "b:" unigrams+bigrams of the first words (where refusals sit)

    def __post_init__(self):
        for lo, hi in (self.word_ngrams, self.char_ngrams):
            if not 1 <= lo <= hi:
                raise ValueError(f"bad n-gram range ({lo}, {hi})")

    @classmethod
    def from_dict(cls, d: dict) -> "AnalyzerSettings":
        return cls(
            max_chars=int(d["max_chars"]),
            word_ngrams=tuple(d["word_ngrams"]),
            char_ngrams=tuple(d["char_ngrams"]),
            lead_words=int(d["lead_words"]),
        )


def _ngrams(tokens: list[str], lo: int, hi: int, prefix: str) -> list[str]:
    out = []
    for n in range(lo, hi + 1):
        out.extend(prefix + " ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return out


def analyze(text: str, settings: AnalyzerSettings = AnalyzerSettings()) -> list[str]:
    """The feature strings of one text (with repeats; their counts are the term frequencies)."""
    text = _WS.sub(" ", (text or "")[: settings.max_chars].lower()).strip()
    words = _WORD.findall(text)
    feats = _ngrams(words, *settings.word_ngrams, "w:")
    feats += _ngrams(words[: settings.lead_words], 1, 2, "b:")
    lo, hi = settings.char_ngrams
    for w in text.split(" "):
        if not w:
            continue
        w = f" {w} "
        for n in range(lo, min(hi, len(w)) + 1):
            feats.extend("c:" + w[i : i + n] for i in range(len(w) - n + 1))
    return feats


@dataclass
class TextClassifier:
    """TF-IDF (sublinear tf, smoothed idf, L2 norm) followed by one logistic head per label."""

    features: list[str]
    idf: np.ndarray
    coefs: dict[str, np.ndarray]
    intercepts: dict[str, float]
    thresholds: dict[str, float] = field(default_factory=dict)
    settings: AnalyzerSettings = field(default_factory=AnalyzerSettings)
    sublinear_tf: bool = True

    def __post_init__(self):
        self.index = {f: i for i, f in enumerate(self.features)}
        n = len(self.features)
        if self.idf.shape != (n,) or any(c.shape != (n,) for c in self.coefs.values()):
            raise DataError(f"classifier weights do not match its {n} features")

    @property
    def heads(self) -> list[str]:
        return sorted(self.coefs)

    def vectorize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Sparse L2-normalised TF-IDF vector of one text as (feature indices, values)."""
        counts = Counter(i for f in analyze(text, self.settings) if (i := self.index.get(f)) is not None)
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        if self.sublinear_tf:
            tf = np.log(tf) + 1.0
        val = tf * self.idf[idx]
        return idx, val / np.linalg.norm(val)

    def decision(self, texts: Sequence[str], head: str = "harmful") -> np.ndarray:
        """Logit of ``head`` for each text (higher = more of the head's property)."""
        if head not in self.coefs:
            raise DataError(f"classifier has no head {head!r}; it has {self.heads}")
        coef, b = self.coefs[head], self.intercepts[head]
        out = np.empty(len(texts))
        for k, text in enumerate(texts):
            idx, val = self.vectorize(text)
            out[k] = float(val @ coef[idx]) + b
        return out

    def decisions(self, texts: Sequence[str], heads: Sequence[str]) -> dict[str, np.ndarray]:
        """Logits of several heads, vectorizing each text once (same numbers as :meth:`decision`)."""
        missing = [h for h in heads if h not in self.coefs]
        if missing:
            raise DataError(f"classifier has no head {missing[0]!r}; it has {self.heads}")
        out = {h: np.empty(len(texts)) for h in heads}
        for k, text in enumerate(texts):
            idx, val = self.vectorize(text)
            for h in heads:
                out[h][k] = float(val @ self.coefs[h][idx]) + self.intercepts[h]
        return out

    def predict_proba(self, texts: Sequence[str], head: str = "harmful") -> np.ndarray:
        """P(head's property) in [0, 1] for each text."""
        z = self.decision(texts, head)
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, directory: str | Path, extra: dict | None = None, dtype: str = "float64") -> None:
        """Write classifier.json + weights.safetensors (``dtype`` float64, float32 or float16, no pickle)."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if dtype not in ("float64", "float32", "float16"):
            raise ValueError(f"dtype must be float64, float32 or float16, got {dtype!r}")
        tensors = {"idf": np.ascontiguousarray(self.idf, dtype=dtype)}
        tensors |= {f"coef.{h}": np.ascontiguousarray(c, dtype=dtype) for h, c in self.coefs.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        cfg = {
            "format_version": FORMAT_VERSION,
            "kind": "tfidf-logreg",
            "analyzer": asdict(self.settings),
            "sublinear_tf": self.sublinear_tf,
            "norm": "l2",
            "heads": {h: {"intercept": self.intercepts[h], "threshold": self.thresholds.get(h, 0.5)} for h in self.heads},
            **({"thresholds": other} if (other := {k: v for k, v in sorted(self.thresholds.items())
                                                    if k not in self.coefs}) else {}),
            **(extra or {}),
            "features": self.features,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path = BUILTIN_DIR) -> "TextClassifier":
        """Read a classifier directory written by :meth:`save`."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise DataError(f"{directory} is not a classifier directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format_version") != FORMAT_VERSION or cfg.get("kind") != "tfidf-logreg":
            raise DataError(f"{cfg_path}: unsupported classifier format {cfg.get('kind')} v{cfg.get('format_version')}")
        w = load_file(str(w_path))
        heads = cfg["heads"]
        return cls(
            features=cfg["features"],
            idf=w["idf"].astype(np.float64),  # float32/16 files compute in float64 like float64 ones
            coefs={h: w[f"coef.{h}"].astype(np.float64) for h in heads},
            intercepts={h: float(v["intercept"]) for h, v in heads.items()},
            thresholds={h: float(v["threshold"]) for h, v in heads.items()}  # decisions of several heads too
            | {k: float(v) for k, v in cfg.get("thresholds", {}).items()},
            settings=AnalyzerSettings.from_dict(cfg["analyzer"]),
            sublinear_tf=bool(cfg["sublinear_tf"]),
        )


@lru_cache(maxsize=4)
def load_classifier(directory: str | None = None) -> TextClassifier:
    """The shipped classifier (or one at ``directory``), loaded once per process."""
    return TextClassifier.load(directory or BUILTIN_DIR)
