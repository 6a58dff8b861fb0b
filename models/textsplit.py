"""Sentences and token-bounded chunks of a text: pure, no model (the token counter is injected).

Used by ``models.classifier`` (a long message is classified chunk by chunk) and meant for the
summaries workload too. Splitting keeps every character of the source in exactly one sentence
(offsets are kept), so a chunk or a sentence can always be traced back to its place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# A sentence ends at . ! ? (with closing quotes/brackets) followed by white space, or at a line
# break. Abbreviations ("Dr.", "e.g.") may split a sentence early; for chunking that costs
# nothing (chunks are packs of sentences).
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*")


@dataclass(frozen=True)
class Span:
    text: str
    start: int
    end: int


def sentences(text: str) -> list[Span]:
    """Non-empty sentences of ``text`` with their offsets (stripped of surrounding white space)."""
    out: list[Span] = []
    pos = 0
    for m in _BOUNDARY.finditer(text):
        _add(text, pos, m.start(), out)
        pos = m.end()
    _add(text, pos, len(text), out)
    return out


def _add(text: str, start: int, end: int, out: list[Span]) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        out.append(Span(stripped, start + lead, start + lead + len(stripped)))


def chunks(text: str, max_tokens: int, count: Callable[[list[str]], list[int]], overhead: int = 2) -> list[Span]:
    """Consecutive pieces of ``text``, each at most ``max_tokens`` tokens as ``count`` measures them
    (``overhead`` tokens per piece are the model's own, e.g. [CLS] and [SEP]). Pieces end at
    sentence boundaries; a single sentence longer than the limit is cut between words."""
    budget = max_tokens - overhead
    if budget < 1:
        raise ValueError("max_tokens leaves no room for text")
    spans = sentences(text)
    if not spans:
        return []
    sizes = [n - overhead for n in count([s.text for s in spans])]
    if sum(sizes) <= budget:
        return [Span(text[spans[0].start:spans[-1].end], spans[0].start, spans[-1].end)]
    pieces: list[Span] = []
    for span, size in zip(spans, sizes):
        pieces.extend([span] if size <= budget else _cut_words(span, budget, count, overhead))
    sizes = [n - overhead for n in count([p.text for p in pieces])]
    out: list[Span] = []
    first, used = pieces[0], sizes[0]
    last = first
    for piece, size in zip(pieces[1:], sizes[1:]):
        if used + size <= budget:
            last, used = piece, used + size
            continue
        out.append(Span(text[first.start:last.end], first.start, last.end))
        first, last, used = piece, piece, size
    out.append(Span(text[first.start:last.end], first.start, last.end))
    return out


def _cut_words(span: Span, budget: int, count: Callable[[list[str]], list[int]], overhead: int) -> list[Span]:
    words = [m for m in re.finditer(r"\S+", span.text)]
    sizes = [n - overhead for n in count([w.group() for w in words])]
    out: list[Span] = []
    begin, used = 0, 0
    for i, size in enumerate(sizes):
        if used and used + size > budget:
            out.append(_word_span(span, words, begin, i))
            begin, used = i, 0
        used += size
    out.append(_word_span(span, words, begin, len(words)))
    return out


def _word_span(span: Span, words: list[re.Match[str]], first: int, stop: int) -> Span:
    start, end = words[first].start(), words[stop - 1].end()
    return Span(span.text[start:end], span.start + start, span.start + end)
