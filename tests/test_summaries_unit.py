"""Summaries without a server: sentence selection, the support check, and the abstractive step's
drop-and-count, with stand-ins for the models (a bag-of-words embedder, a scripted LLM)."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.bridge import Delta, Final
from models.client import Embeddings
from models.extractive import heading_bonus, select
from models.support import content_words, support
from models.textsplit import sentences
from server.local import LocalAnswer
from server.workloads.summaries import Io, Plan, SummariesWorkload, Summary

NOTE = """Presenting complaint:
Mr Ahmed, 68, was admitted with fever, productive cough and shortness of breath for three days.

Hospital course:
Chest X-ray showed right lower lobe consolidation. He was treated with IV ceftriaxone and oral azithromycin.
His oxygen requirement settled by day 3. The ward was busy that week. The weather was cold.

Discharge medications:
Amoxicillin 500 mg three times a day for 5 days.

Follow-up:
GP review in one week. Repeat chest X-ray in six weeks."""


def bow(texts: list[str]) -> np.ndarray:
    """A faithful-enough embedder for tests: hashed bag of words (numbers left out, as a sentence
    embedder barely tells "day 3" from "day 5"), L2-normalised."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for i, text in enumerate(texts):
        for w in re.findall(r"[a-z]+", text.lower()):
            out[i, zlib.crc32(w.encode()) % 256] += 1.0
        out[i] /= max(float(np.linalg.norm(out[i])), 1e-9)
    return out


def test_extractive_picks_are_verbatim_in_document_order_within_the_budget() -> None:
    spans = sentences(NOTE)
    picks = select(NOTE, spans, bow([s.text for s in spans]), max_words=40)
    assert picks and sum(len(p.span.text.split()) for p in picks) <= 40
    assert all(NOTE[p.span.start:p.span.end] == p.span.text for p in picks)
    assert [p.span.start for p in picks] == sorted(p.span.start for p in picks)
    assert not any(p.span.text.endswith(":") for p in picks)  # headings are not summary sentences
    # Sentences under the key headings (presenting complaint, discharge medications, follow-up)
    # weigh more; the hospital course's small talk does not.
    bonus = dict(zip((s.text for s in spans), heading_bonus(NOTE, spans)))
    assert bonus["Amoxicillin 500 mg three times a day for 5 days."] > 0 and bonus["GP review in one week."] > 0
    assert bonus["The ward was busy that week."] == 0


def test_a_sentence_longer_than_the_budget_is_cut_at_a_word() -> None:
    text = "One two three four five six seven eight nine ten."
    picks = select(text, sentences(text), bow([text]), max_words=4)
    assert [p.span.text for p in picks] == ["One two three four"]


def test_support_requires_similarity_overlap_and_the_same_numbers() -> None:
    spans = [s.text for s in sentences(NOTE)]
    vectors, words = bow(spans), content_words(NOTE)

    def check(sentence: str) -> bool:
        return support(bow([sentence])[0], sentence, vectors, words, spans).supported

    assert check("He was treated with IV ceftriaxone and oral azithromycin.")
    assert not check("His oxygen requirement settled by day 5.")  # the note says day 3
    assert not check("He was started on warfarin for atrial fibrillation.")  # nothing of it in the note


@dataclass
class _Entry:
    id: str = "chat"
    context_length: int = 4096


class _Client:
    def __init__(self, script: str) -> None:
        self.script = script

    async def embed(self, model: str, texts: list[str], priority: int) -> Embeddings:
        return Embeddings(bow(texts), sum(len(t.split()) for t in texts))

    async def generate(self, *args: Any) -> AsyncIterator[Any]:
        for word in re.findall(r"\S+\s*", self.script):
            yield Delta(word)
        yield Final("stop", prompt_tokens=100, completion_tokens=len(self.script.split()))


class _Local:
    def __init__(self, script: str) -> None:
        self.client = _Client(script)
        self.registry = SimpleNamespace(get=lambda _id: None)
        llm = SimpleNamespace(tokenize=lambda text, special=True: text.split(), render_chat=lambda messages: messages[-1]["content"])
        self.entry = SimpleNamespace(id="chat", context_length=4096, llm=llm,
                                     engine=SimpleNamespace(max_length=256, count_tokens=lambda ts: [len(t.split()) + 2 for t in ts]))

    def resolve(self, model_id: str, kind: Any) -> Any:
        return self.entry

    async def call(self, awaitable: Any, receive: Any) -> Any:
        return await awaitable


def test_unsupported_sentences_of_an_llm_are_dropped_and_counted() -> None:
    script = ("He was treated with IV ceftriaxone and oral azithromycin. He was started on warfarin for atrial fibrillation. "
              "GP review in one week.")
    workload = SummariesWorkload(_Local(script))  # type: ignore[arg-type]
    plan = Plan("abstractive", "emb", "chat", 60, LocalAnswer("chat"))
    summary = Summary("abstractive")

    async def run() -> list[tuple[str, Any]]:
        return [s async for s in workload.abstractive(NOTE, plan, Io(None), summary)]

    kept = asyncio.run(run())
    assert [t for t, _ in kept] == ["He was treated with IV ceftriaxone and oral azithromycin.", "GP review in one week."]
    assert summary.unsupported_dropped == 1 and summary.parts == 1
    # Each kept sentence points at the source sentence that supports it.
    assert all(NOTE[span.start:span.end] for _, span in kept)
    assert "ceftriaxone" in NOTE[kept[0][1].start:kept[0][1].end]


def test_a_source_longer_than_the_context_is_mapped_then_reduced() -> None:
    local = _Local("Chest X-ray showed right lower lobe consolidation.")
    local.entry.context_length = 600  # a part budget of 256 words with this tokenizer
    workload = SummariesWorkload(local)  # type: ignore[arg-type]
    long_note = "\n".join([NOTE] * 12)
    summary = Summary("abstractive")

    async def run() -> list[tuple[str, Any]]:
        return [s async for s in workload.abstractive(long_note, Plan("abstractive", "emb", "chat", 60, LocalAnswer("chat")),
                                                       Io(None), summary)]

    kept = asyncio.run(run())
    assert summary.parts >= 2 and [t for t, _ in kept] == ["Chest X-ray showed right lower lobe consolidation."]
