"""Lexical features for the triage head: TF-IDF of word 1-2-grams and of character 2-5-grams.

Pure numpy, no model; built from the training texts at training time and stored with the head
(``models.classifier``), so training and serving featurise a text the same way by construction.

Why a sentence embedding is not enough on its own: a general-purpose embedder blurs the words
that decide urgency in clinical messages (abbreviations such as "SOB", "c/o", "x3"; "since
yesterday" against "for months"), while n-grams keep them; the embedding carries paraphrase and
word-order knowledge the n-grams lack. Cross-validated on the training split, the head on both
beat either alone (README, "Workloads").

Weighting, as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``: ``(1 + ln tf) × idf`` with
``idf = ln((1 + n) / (1 + df)) + 1``, each block L2-normalised on its own. Character n-grams are
taken inside words padded with one space (``char_wb``), and need ``min_df = 2``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def word_ngrams(text: str) -> list[str]:
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


def char_ngrams(text: str) -> list[str]:
    out: list[str] = []
    for word in text.lower().split():
        padded = f" {word} "
        size = len(padded)
        for n in range(2, 6):
            if n > size:
                break
            out.extend(padded[i:i + n] for i in range(size - n + 1))
    return out


_WORD_CACHE = 50_000


class Block:
    """One TF-IDF block: a vocabulary (n-gram -> column) and its idf weights."""

    def __init__(self, vocab: dict[str, int], idf: np.ndarray, kind: str) -> None:
        self.vocab = vocab
        self.idf = idf
        self.kind = kind
        self._grams = word_ngrams if kind == "word" else char_ngrams
        self._word_columns: dict[str, list[int]] = {}
        """char blocks: a word's in-vocabulary n-gram columns (words repeat: most texts hit the cache)."""

    @classmethod
    def fit(cls, texts: Iterable[str], kind: str, min_df: int) -> "Block":
        grams = word_ngrams if kind == "word" else char_ngrams
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            df.update(set(grams(text)))
            n += 1
        terms = sorted(t for t, c in df.items() if c >= min_df)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in terms], dtype=np.float64)
        return cls({t: i for i, t in enumerate(terms)}, idf, kind)

    def _counts(self, text: str) -> Counter[Any]:
        if self.kind == "word":
            return Counter(self.vocab[g] for g in word_ngrams(text) if g in self.vocab)
        cache, vocab = self._word_columns, self.vocab
        counts: Counter[int] = Counter()
        for word in text.lower().split():
            columns = cache.get(word)
            if columns is None:
                columns = [vocab[g] for g in char_ngrams(word) if g in vocab]
                if len(cache) < _WORD_CACHE:
                    cache[word] = columns
            counts.update(columns)
        return counts

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of one text's L2-normalised row."""
        counts = self._counts(text)
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        cols = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        vals = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * self.idf[cols]
        return cols, vals / np.linalg.norm(vals)


class LexicalFeatures:
    """Word and character blocks side by side: columns ``[0, words)`` then ``[words, words + chars)``."""

    def __init__(self, words: Block, chars: Block) -> None:
        self.words = words
        self.chars = chars

    @property
    def size(self) -> int:
        return len(self.words.vocab) + len(self.chars.vocab)

    @classmethod
    def fit(cls, texts: list[str]) -> "LexicalFeatures":
        return cls(Block.fit(texts, "word", 1), Block.fit(texts, "char", 2))

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        wc, wv = self.words.transform_one(text)
        cc, cv = self.chars.transform_one(text)
        return np.concatenate([wc, cc + len(self.words.vocab)]), np.concatenate([wv, cv])

    def matrix(self, texts: list[str]) -> Any:
        """A scipy CSR matrix [len(texts), size] (training only)."""
        from scipy.sparse import csr_matrix

        rows = [self.row(text) for text in texts]
        indptr = np.cumsum([0] + [cols.size for cols, _ in rows])
        indices = np.concatenate([cols for cols, _ in rows]) if rows else np.zeros(0, dtype=np.int64)
        data = np.concatenate([vals for _, vals in rows]) if rows else np.zeros(0)
        return csr_matrix((data, indices, indptr), shape=(len(texts), self.size))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for block in (self.words, self.chars):
            terms = sorted(block.vocab, key=block.vocab.__getitem__)
            arrays[f"{prefix}{block.kind}_terms"] = np.array(terms, dtype=str)
            arrays[f"{prefix}{block.kind}_idf"] = block.idf
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "LexicalFeatures":
        blocks = []
        for kind in ("word", "char"):
            terms = [str(t) for t in arrays[f"{prefix}{kind}_terms"]]
            blocks.append(Block({t: i for i, t in enumerate(terms)}, np.asarray(arrays[f"{prefix}{kind}_idf"]), kind))
        return cls(*blocks)
