"""Is a generated sentence supported by its source? Pure (numpy only).

Used by ``server.workloads.summaries`` on every sentence an LLM writes for an abstractive
summary. A sentence is supported when all hold:
- **embedding similarity**: its best cosine to a sentence of the source is at least
  ``MIN_COSINE`` (the claim is about something the source says);
- **token overlap**: at least ``MIN_OVERLAP`` of its content words (lowercase words of three or
  more letters, not stop words; numbers count too) occur in the source (the claim does not
  bring names, drugs, doses or findings of its own);
- **numbers**: every number it states occurs in one of the (at most ``NUMBER_WINDOW``) source
  sentences most similar to it that are themselves similar enough to support it ("settled by day 5" is not supported by "settled by day 3", even when a
  "5" occurs elsewhere in the note).
The thresholds are deliberately strict: a dropped true sentence costs a little coverage, a kept
invented finding costs trust. The check cannot catch a sentence that recombines true words into
a false statement ("no pneumonia" from "pneumonia ... no fever"); the README says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MIN_COSINE = 0.55
MIN_OVERLAP = 0.7
NUMBER_WINDOW = 2
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z][a-z'-]{2,}|\d+(?:\.\d+)?")
STOP = frozenset("""the and for with was were has have had that this from are but not his her him she they them their
there then than into onto over under also been being which who whom what when where why how all any each
few more most other some such only own same too very can will just should now patient pt""".split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP}


@dataclass(frozen=True)
class Support:
    cosine: float
    overlap: float
    best: int
    """Index of the most similar source sentence (its span is the sentence's evidence)."""
    numbers_found: bool = True

    @property
    def supported(self) -> bool:
        return self.cosine >= MIN_COSINE and self.overlap >= MIN_OVERLAP and self.numbers_found


def support(vector: np.ndarray, text: str, source_vectors: np.ndarray, source_words: set[str],
            source_texts: list[str]) -> Support:
    sims = source_vectors @ vector
    if not sims.size:
        return Support(0.0, 0.0, -1, False)
    best = int(sims.argmax())
    words = content_words(text)
    overlap = len(words & source_words) / len(words) if words else 0.0
    near = [int(i) for i in np.argsort(-sims)[:NUMBER_WINDOW] if sims[i] >= MIN_COSINE] or [best]
    evidence = {n for i in near for n in _NUMBER.findall(source_texts[i])}
    numbers = set(_NUMBER.findall(text)) <= evidence
    return Support(float(sims[best]), overlap, best, numbers)
