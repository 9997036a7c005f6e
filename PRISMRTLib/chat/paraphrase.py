"""The paraphrase classifier: the parser's fallback for the kind of a question when no rule settles it.

A multinomial logistic regression over hashed word, word-pair and character n-grams, trained in numpy at first use
on the questions in ``data/paraphrases.jsonl`` (written for this project: ``{"question", "kind"}`` per line, every
kind of :data:`.types.KINDS`). Training is deterministic (fixed hashing, zero start, full-batch steps) and takes a
fraction of a second, so no weights file is shipped. The parser gives it the *normalised* question (typos fixed,
structures replaced by ``xstructx``), so it learns wordings, not organ names.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .types import KINDS

DATA = Path(__file__).resolve().parent / "data" / "paraphrases.jsonl"
DIM = 1 << 18  # hashed feature space; only the features seen in training get weights
STEPS = 60  # held-out accuracy is flat from ~30 steps on; fitting stays well under a second
LR = 0.3
L2 = 1e-4


def load_examples(path: Path | str | None = None) -> list[tuple[str, str]]:
    """(question, kind) pairs of a JSON-lines file (default :data:`DATA`); an unknown kind raises (the file is
    ours)."""
    path = DATA if path is None else path
    out = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if item["kind"] not in KINDS:
            raise ValueError(f"{path}:{line_no}: unknown kind {item['kind']!r}")
        out.append((item["question"], item["kind"]))
    return out


def split(examples: Sequence, every: int = 5) -> tuple[list, list]:
    """(train, held out): every ``every``-th example is held out (deterministic, spread over all kinds)."""
    train = [e for k, e in enumerate(examples) if k % every != every - 1]
    held = [e for k, e in enumerate(examples) if k % every == every - 1]
    return train, held


def features(text: str) -> dict[int, float]:
    """Hashed features of a (normalised) question: words, word pairs, the opening word, character 3/4-grams of
    each word; log counts, unit length."""
    words = str(text).lower().split()[:80]
    counts: Counter = Counter()
    if words:
        counts["f:" + words[0]] += 1
    counts["n:" + str(min(words.count("xstructx"), 3))] += 1
    for w in words:
        counts["w:" + w] += 1
        padded = f"<{w}>"
        for n in (3, 4):
            for i in range(len(padded) - n + 1):
                counts["c:" + padded[i:i + n]] += 1
    for a, b in zip(words, words[1:]):
        counts["b:" + a + "_" + b] += 1
    hashed: dict[int, float] = {}
    for key, c in counts.items():
        h = zlib.crc32(key.encode("utf-8")) & (DIM - 1)
        hashed[h] = hashed.get(h, 0.0) + 1.0 + math.log(c)
    norm = math.sqrt(sum(v * v for v in hashed.values())) or 1.0
    return {h: v / norm for h, v in hashed.items()}


class ParaphraseClassifier:
    """``fit`` on (text, kind) pairs, then ``predict_proba(text)`` -> {kind: probability}."""

    def __init__(self, prepare: Callable[[str], str] | None = None, *, steps: int = STEPS, lr: float = LR,
                 l2: float = L2):
        self.prepare = prepare or (lambda q: q)
        self.steps, self.lr, self.l2 = steps, lr, l2
        self.classes: tuple[str, ...] = ()
        self.columns: dict[int, int] = {}
        self.W = np.zeros((0, 0), np.float32)
        self.b = np.zeros(0, np.float32)

    def _matrix(self, texts: Iterable[str], grow: bool):
        rows, cols, vals = [], [], []
        for r, text in enumerate(texts):
            for h, v in features(self.prepare(text)).items():
                c = self.columns.get(h)
                if c is None:
                    if not grow:
                        continue
                    c = self.columns[h] = len(self.columns)
                rows.append(r)
                cols.append(c)
                vals.append(v)
        return np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float32)

    def fit(self, examples: Sequence[tuple[str, str]]) -> "ParaphraseClassifier":
        self.classes = tuple(k for k in KINDS if any(kind == k for _, kind in examples))
        if not self.classes:
            return self
        index = {k: i for i, k in enumerate(self.classes)}
        self.columns = {}
        rows, cols, vals = self._matrix([q for q, _ in examples], grow=True)
        n, d, k = len(examples), len(self.columns), len(self.classes)
        y = np.zeros((n, k), np.float32)
        y[np.arange(n), [index[kind] for _, kind in examples]] = 1.0
        X = np.zeros((n, d), np.float32)  # dense: a few thousand seen features, faster than sparse products here
        X[rows, cols] = vals
        W = np.zeros((d, k), np.float32)
        b = np.zeros(k, np.float32)
        m_w, v_w = np.zeros_like(W), np.zeros_like(W)
        m_b, v_b = np.zeros_like(b), np.zeros_like(b)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.steps + 1):  # full-batch Adam from zero: deterministic
            logits = X @ W + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            g = (p - y) / n
            gW = X.T @ g + self.l2 * W
            gb = g.sum(axis=0)
            m_w = beta1 * m_w + (1 - beta1) * gW
            v_w = beta2 * v_w + (1 - beta2) * gW * gW
            m_b = beta1 * m_b + (1 - beta1) * gb
            v_b = beta2 * v_b + (1 - beta2) * gb * gb
            c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
            W -= self.lr * (m_w / c1) / (np.sqrt(v_w / c2) + eps)
            b -= self.lr * (m_b / c1) / (np.sqrt(v_b / c2) + eps)
        self.W, self.b = W, b
        return self

    def predict_proba(self, text: str, prepared: bool = False) -> dict[str, float]:
        """{kind: probability}; ``prepared``: ``text`` has already been through ``prepare``."""
        if not self.classes:
            return {}
        logits = self.b.astype(np.float64).copy()
        for h, v in features(text if prepared else self.prepare(text)).items():
            c = self.columns.get(h)
            if c is not None:
                logits += v * self.W[c]
        logits -= logits.max()
        p = np.exp(logits)
        p /= p.sum()
        return {k: float(x) for k, x in zip(self.classes, p)}

    def predict(self, text: str) -> str:
        probs = self.predict_proba(text)
        return max(probs, key=probs.get)

    def accuracy(self, examples: Sequence[tuple[str, str]]) -> float:
        if not examples:
            return float("nan")
        return sum(self.predict(q) == kind for q, kind in examples) / len(examples)


def default_classifier() -> ParaphraseClassifier:
    """The classifier the parser uses: all of ``paraphrases.jsonl``, read through the parser's normalisation."""
    from .parser import classifier_text

    return ParaphraseClassifier(prepare=classifier_text).fit(load_examples())
