"""Extractive summaries: choose sentences of the source, copy them verbatim. Pure (numpy only).

Called by ``server.workloads.summaries`` with the source's sentences (``models.textsplit``)
and their embeddings. Selection is maximal marginal relevance (MMR) over the embeddings:
- a sentence's relevance is its cosine to the document's centroid (how central it is), plus a
  bonus when it sits under a section heading that clinicians read first (assessment, plan,
  discharge medications, follow-up...);
- each pick maximises ``λ × relevance − (1 − λ) × its highest cosine to a sentence already
  picked`` (redundancy penalty), among the sentences that still fit in ``max_words``;
- the picks are returned in document order.
A sentence is never edited: the summary cannot contain a word the source does not, in an order
the source does not. It can still omit something important or lose context between sentences;
the README says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from models.textsplit import Span

LAMBDA = 0.7
SHORTLIST = 160
HEADING_BONUS = 0.15
MIN_WORDS = 3
_KEY_SECTIONS = re.compile(
    r"^\s*(presenting complaint|chief complaint|reason for admission|assessment(?: and plan)?|a/p|plan|impression|diagnos[ie]s|discharge diagnos[ie]s|discharge medications?|"
    r"medications? on discharge|discharge plan|follow[- ]?up|disposition|recommendations?|summary|"
    r"condition on discharge)\s*:",
    re.IGNORECASE | re.MULTILINE)
_ANY_HEADING = re.compile(r"^\s*([A-Za-z][A-Za-z /&-]{1,40})\s*:", re.MULTILINE)


@dataclass(frozen=True)
class Pick:
    index: int
    span: Span
    relevance: float


def words(text: str) -> int:
    return len(text.split())


def key_section_starts(text: str) -> list[tuple[int, bool]]:
    """(offset, is_key) for every ``Heading:`` at the start of a line, in order."""
    key = {m.start() for m in _KEY_SECTIONS.finditer(text)}
    return [(m.start(), m.start() in key) for m in _ANY_HEADING.finditer(text)]


def heading_bonus(text: str, spans: list[Span]) -> np.ndarray:
    """HEADING_BONUS for sentences under a key heading (until the next heading of any kind)."""
    starts = key_section_starts(text)
    bonus = np.zeros(len(spans))
    j, current = 0, False
    for i, span in enumerate(spans):
        while j < len(starts) and starts[j][0] <= span.start:
            current = starts[j][1]
            j += 1
        bonus[i] = HEADING_BONUS if current else 0.0
    return bonus


def shortlist(text: str, spans: list[Span], limit: int = SHORTLIST) -> list[int]:
    """Indices (in document order) of the ``limit`` most central sentences by word TF-IDF
    (1-2-grams, sublinear tf, as ``models.lexical``; each sentence's n-grams computed once)."""
    if len(spans) <= limit:
        return list(range(len(spans)))
    from collections import Counter

    from models.lexical import word_ngrams

    counts = [Counter(word_ngrams(s.text)) for s in spans]
    df: Counter[str] = Counter()
    for c in counts:
        df.update(c.keys())
    vocab = {t: i for i, t in enumerate(df)}
    n = len(spans)
    idf = np.log((1 + n) / (1 + np.fromiter(df.values(), dtype=np.float64, count=len(df)))) + 1.0
    rows = []
    centroid = np.zeros(len(vocab))
    for c in counts:
        cols = np.fromiter((vocab[t] for t in c), dtype=np.int64, count=len(c))
        vals = (1.0 + np.log(np.fromiter(c.values(), dtype=np.float64, count=len(c)))) * idf[cols]
        if vals.size:
            vals /= np.linalg.norm(vals)
        centroid[cols] += vals
        rows.append((cols, vals))
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    score = np.array([float(vals @ centroid[cols]) if cols.size else 0.0 for cols, vals in rows]) + heading_bonus(text, spans)
    score[np.array([words(s.text) < MIN_WORDS or s.text.endswith(":") for s in spans])] = -np.inf
    return sorted(int(i) for i in np.argsort(-score)[:limit])


def select(text: str, spans: list[Span], vectors: np.ndarray, max_words: int, lam: float = LAMBDA) -> list[Pick]:
    """MMR selection within ``max_words``; ``vectors`` are the spans' L2-normalised embeddings."""
    if not spans:
        return []
    centroid = vectors.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    relevance = vectors @ centroid + heading_bonus(text, spans)
    sizes = np.array([words(s.text) for s in spans])
    # A heading ("Plan:", "ECG on Day 1:") is not a summary sentence.
    eligible = (sizes >= min(MIN_WORDS, int(sizes.max()))) & ~np.array([s.text.endswith(":") for s in spans])
    if not eligible.any():
        eligible[:] = True
    chosen: list[int] = []
    redundancy = np.zeros(len(spans))
    budget = max_words
    while True:
        fits = eligible & (sizes <= budget)
        fits[chosen] = False
        if not fits.any():
            break
        score = lam * relevance - (1 - lam) * redundancy
        score[~fits] = -np.inf
        best = int(score.argmax())
        chosen.append(best)
        budget -= int(sizes[best])
        redundancy = np.maximum(redundancy, vectors @ vectors[best])
    if not chosen:  # every sentence is longer than max_words: the most relevant one, cut at a word boundary
        best = int(relevance.argmax())
        span = spans[best]
        last = list(re.finditer(r"\S+", span.text))[max(0, max_words - 1)]
        end = span.start + last.end()
        return [Pick(best, Span(text[span.start:end], span.start, end), float(relevance[best]))]
    return [Pick(i, spans[i], float(relevance[i])) for i in sorted(chosen)]
