"""Summaries that cannot invent findings: ``POST /v1/summarize`` and the ``summaries`` workload.

Called by ``server.routing.Router`` on the event-loop thread. Two methods:

- ``extractive`` (the embedded default): the source is cut into sentences, every sentence is
  embedded through the shared embedding queue (one submission, at the workload's priority), and
  ``models.extractive.select`` picks central, non-redundant sentences within ``max_words``.
  They are returned verbatim, in document order, each with its ``source_span``. Any length.
- ``abstractive``: the local chat model writes the summary. A source longer than the model's
  context is cut on token counts at sentence boundaries; the parts are summarised together (one
  submission each, so the batching core runs them as one batch), then the partial summaries are
  summarised (map-reduce, repeated while they are still too long, at most five rounds; after
  that the final step reads as much as fits), the final step streaming.
  Every sentence the model writes is checked against the source (``models.support``):
  unsupported sentences are dropped and counted, and each kept sentence carries the span of the
  source sentence that supports it. Streaming is sentence by sentence: a sentence is sent once
  it has been checked.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from starlette.responses import JSONResponse, Response

from models.bridge import Delta, Final
from models.catalog import ModelKind
from models.extractive import SHORTLIST, select, shortlist
from models.registry import ModelEntry
from models.sequence import SamplingParams
from models.support import content_words, support
from models.textsplit import Span, chunks, sentences
from server import openai_format as fmt
from server.errors import InvalidRequest
from server.local import SSE_HEADERS, LocalAnswer, LocalModels, Receive, engine_error
from server.schemas import ChatCompletionRequest, Text, _Strict
from server.sse import SseResponse
from server.workloads.common import MAX_INPUT_CHARS, last_user_text

DEFAULT_MAX_WORDS = 150
METHODS = ("extractive", "abstractive")
_PART_OUTPUT_TOKENS = 320
_PROMPT_RESERVE_TOKENS = 160
_MAX_REDUCE_ROUNDS = 5
SYSTEM = ("You summarise clinical notes for a colleague. Use only facts written in the note. "
          "Keep diagnoses, medications with doses, and follow-up plans. Do not add anything.")

Done = Callable[..., None]


class Io:
    """The request's ``receive`` while the response has not started (a disconnect then cancels
    the work); set to None once a stream starts, when Starlette itself watches for disconnects
    and cancels the stream's generator."""

    def __init__(self, receive: Receive | None) -> None:
        self.receive = receive


class SummarizeRequest(_Strict):
    model: str | None = Field(default=None, min_length=1)
    input: Text
    max_words: int | None = Field(default=None, ge=1, le=5000)
    method: Literal["extractive", "abstractive"] | None = None
    stream: bool = False

    @field_validator("input")
    @classmethod
    def _input(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("input is empty")
        if len(v) > MAX_INPUT_CHARS:
            raise ValueError(f"input has {len(v)} characters; at most {MAX_INPUT_CHARS} are accepted")
        return v


@dataclass(frozen=True)
class Plan:
    """What a summary request will use: method, models, length, queue class."""

    method: str
    embedding_model: str
    chat_model: str | None
    max_words: int
    answer: LocalAnswer

    @property
    def model(self) -> str:
        """The model that writes the summary: the chat model (abstractive) or the embedder."""
        return (self.chat_model if self.method == "abstractive" else None) or self.embedding_model


@dataclass
class Summary:
    method: str
    sentences: list[tuple[str, Span | None]] = field(default_factory=list)
    parts: int = 1
    unsupported_dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return " ".join(t for t, _ in self.sentences)

    def body(self, model: str, answer: LocalAnswer) -> dict[str, Any]:
        return {
            "object": "summary", "summary": self.text, "method": self.method, "parts": self.parts,
            "sentences": [{"text": t, "source_span": [s.start, s.end] if s else None} for t, s in self.sentences],
            "unsupported_dropped": self.unsupported_dropped, "model": model,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
            "understudy": answer.marker(),
        }

    def provenance(self, hashes: dict[str, str]) -> str:
        return json.dumps({"method": self.method, "parts": self.parts, "sentences": len(self.sentences),
                           "unsupported_dropped": self.unsupported_dropped, **hashes}, separators=(",", ":"))


@dataclass
class _Source:
    spans: list[Span]
    vectors: np.ndarray
    words: set[str]
    tokens: int

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.spans]


class SummariesWorkload:
    def __init__(self, local: LocalModels) -> None:
        self.local = local
        self._cpu = asyncio.Semaphore(1)

    # -- the source, embedded ------------------------------------------------------------------
    async def _embed_source(self, text: str, plan: Plan, io: Io, limit_sentences: int | None = None) -> _Source:
        """The source's sentences and their embeddings (all of them, or a lexical shortlist of
        ``limit_sentences`` for extractive selection of a long note)."""
        engine = self.local.resolve(plan.embedding_model, ModelKind.EMBEDDING).engine
        limit = engine.max_length
        spans: list[Span] = []
        for s in sentences(text):
            if len(s.text) < limit:  # a token is at least one character: surely short enough
                spans.append(s)
            else:
                spans.extend(Span(p.text, s.start + p.start, s.start + p.end) for p in chunks(s.text, limit, engine.count_tokens))
        if limit_sentences is not None and len(spans) > limit_sentences:
            # Pure Python over every sentence (tens of ms for a long note): off the event loop, so
            # that a burst of long notes does not hold up the triage requests queued behind it.
            # One at a time: a burst of notes then shares the GIL with the loop through one thread.
            async with self._cpu:
                keep = await asyncio.to_thread(shortlist, text, spans, limit_sentences)
            spans = [spans[i] for i in keep]
        order = sorted(range(len(spans)), key=lambda i: len(spans[i].text))  # batches are padded to their longest
        result = await self.local.call(self.local.client.embed(plan.embedding_model, [spans[i].text for i in order],
                                                               plan.answer.priority), io.receive)
        vectors = np.empty_like(result.vectors)
        vectors[order] = result.vectors
        return _Source(spans, vectors, content_words(text), result.tokens)

    # -- extractive ------------------------------------------------------------------------------
    async def extractive(self, text: str, plan: Plan, io: Io, summary: Summary) -> Summary:
        source = await self._embed_source(text, plan, io, SHORTLIST)
        picks = select(text, source.spans, source.vectors, plan.max_words)
        summary.sentences = [(p.span.text, p.span) for p in picks]
        summary.prompt_tokens = source.tokens
        return summary

    # -- abstractive -----------------------------------------------------------------------------
    async def abstractive(self, text: str, plan: Plan, io: Io, summary: Summary) -> AsyncIterator[tuple[str, Span]]:
        """Yields checked sentences as they are written (the caller's ``summary`` is filled in)."""
        if plan.chat_model is None:
            raise InvalidRequest("Abstractive summaries need a local chat model, and this workload has none.", param="method")
        entry = self.local.resolve(plan.chat_model, ModelKind.CHAT)
        source_task = asyncio.ensure_future(self._embed_source(text, plan, io))
        try:
            # Per step: a prompt reserve, the part, and the step's output must fit the context.
            output = self._output_tokens(entry, plan)
            budget = max(64, entry.context_length - output - _PROMPT_RESERVE_TOKENS)
            count = lambda ts: [len(entry.llm.tokenize(t, special=False)) for t in ts]  # noqa: E731
            parts = _fit(text, budget, count)
            summary.parts = len(parts)
            rounds = 0
            while len(parts) > 1 and rounds < _MAX_REDUCE_ROUNDS:  # map: every part at once (one batch), then reduce
                partials = await asyncio.gather(*[self._complete(entry, p, plan, summary, io) for p in parts])
                parts = _fit("\n".join(partials), budget, count)
                rounds += 1
                if len(parts) > 1:
                    summary.parts += len(parts)
            source = await source_task
            summary.prompt_tokens += source.tokens
            async for sentence in self._final(entry, parts[0], plan, summary, source, io):
                yield sentence
        finally:
            source_task.cancel()

    @staticmethod
    def _output_tokens(entry: ModelEntry, plan: Plan) -> int:
        """A step's output limit: about two tokens a word of ``max_words``, and never more than a
        third of the context (so each reduce round shrinks the text)."""
        return max(32, min(_PART_OUTPUT_TOKENS, 2 * plan.max_words + 16, (entry.context_length - _PROMPT_RESERVE_TOKENS) // 3))

    def _prompt(self, entry: ModelEntry, text: str, plan: Plan) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Summarise this clinical note in at most {plan.max_words} words.\n\n{text}"}]
        return entry.llm.tokenize(entry.llm.render_chat(messages))

    async def _generate(self, entry: ModelEntry, text: str, plan: Plan, summary: Summary) -> AsyncIterator[str]:
        tokens = self._prompt(entry, text, plan)
        limit = min(self._output_tokens(entry, plan), max(16, entry.context_length - len(tokens)))
        sampling = SamplingParams(temperature=0.0, repetition_penalty=1.1)
        try:
            async for item in self.local.client.generate(entry.id, tokens, limit, sampling, (), plan.answer.priority):
                if isinstance(item, Delta):
                    yield item.text
                elif isinstance(item, Final):
                    summary.prompt_tokens += item.prompt_tokens
                    summary.completion_tokens += item.completion_tokens
        except Exception as exc:
            if isinstance(exc, (InvalidRequest, asyncio.CancelledError)):
                raise
            raise engine_error(exc) from None

    async def _complete(self, entry: ModelEntry, text: str, plan: Plan, summary: Summary, io: Io) -> str:
        async def run() -> str:
            return "".join([piece async for piece in self._generate(entry, text, plan, summary)])
        return await self.local.call(run(), io.receive)

    async def _final(self, entry: ModelEntry, text: str, plan: Plan, summary: Summary, source: _Source,
                     io: Io) -> AsyncIterator[tuple[str, Span]]:
        buffer = ""
        async for piece in self._generate(entry, text, plan, summary):
            buffer += piece
            done = sentences(buffer)
            if len(done) > 1 and re.search(r"[.!?]\s", buffer):
                for s in done[:-1]:
                    checked = await self._check(s.text, plan, source, summary, io)
                    if checked is not None:
                        yield checked
                buffer = buffer[done[-1].start:]
        for s in sentences(buffer):
            checked = await self._check(s.text, plan, source, summary, io)
            if checked is not None:
                yield checked

    async def _check(self, sentence: str, plan: Plan, source: _Source, summary: Summary,
                     io: Io) -> tuple[str, Span] | None:
        result = await self.local.call(self.local.client.embed(plan.embedding_model, [sentence], plan.answer.priority), io.receive)
        verdict = support(result.vectors[0], sentence, source.vectors, source.words, source.texts)
        if not verdict.supported:
            summary.unsupported_dropped += 1
            return None
        summary.sentences.append((sentence, source.spans[verdict.best]))
        return sentence, source.spans[verdict.best]

    # -- HTTP ------------------------------------------------------------------------------------
    def _hashes(self, plan: Plan) -> dict[str, str]:
        out = {}
        for role, model_id in (("embedding", plan.embedding_model), ("chat", plan.chat_model)):
            entry = self.local.registry.get(model_id) if model_id else None
            if entry is not None and (role == "embedding" or plan.method == "abstractive"):
                out[f"{role}_sha256"] = entry.spec.sha256
        return out

    async def summarize(self, text: str, plan: Plan, io: Io) -> Summary:
        summary = Summary(plan.method)
        async for _ in self._sentences(text, plan, io, summary):
            pass
        return summary

    async def _sentences(self, text: str, plan: Plan, io: Io, summary: Summary) -> AsyncIterator[tuple[str, Span | None]]:
        if plan.method == "extractive":
            for item in list((await self.extractive(text, plan, io, summary)).sentences):
                yield item
        else:
            async for item in self.abstractive(text, plan, io, summary):
                yield item

    async def api(self, req: SummarizeRequest, plan: Plan, receive: Receive | None, headers: dict[str, str], done: Done) -> Response:
        io = Io(receive)
        model = plan.model
        if not req.stream:
            summary = await self.summarize(req.input, plan, io)
            done(200, summary.prompt_tokens, summary.completion_tokens, provenance=summary.provenance(self._hashes(plan)))
            return JSONResponse(summary.body(model, plan.answer), headers=headers)
        summary = Summary(plan.method)
        stream = await _opened(self._sentences(req.input, plan, io, summary), io)

        async def events() -> AsyncIterator[bytes]:
            status = 499
            try:
                async for text, span in stream:
                    yield fmt.sse({"object": "summary.sentence", "text": text, "source_span": [span.start, span.end] if span else None})
                status = 200
                yield fmt.sse(summary.body(model, plan.answer)) + fmt.DONE
            finally:
                done(status, summary.prompt_tokens, summary.completion_tokens, provenance=summary.provenance(self._hashes(plan)))
        return SseResponse(events(), headers={**SSE_HEADERS, **headers})

    async def chat(self, req: ChatCompletionRequest, plan: Plan, rid: str, receive: Receive | None,
                   headers: dict[str, str], done: Done) -> Response:
        io = Io(receive)
        text = last_user_text(req, "A summaries workload")
        model = plan.model
        notice = plan.answer.notice or ""
        if not req.stream:
            summary = await self.summarize(text, plan, io)
            done(200, summary.prompt_tokens, summary.completion_tokens, provenance=summary.provenance(self._hashes(plan)))
            use = fmt.usage(summary.prompt_tokens, summary.completion_tokens)
            body = fmt.completion_body(True, rid, model, summary.text + notice, "stop", use)
            body["understudy"] = plan.answer.marker()
            return JSONResponse(body, headers=headers)
        summary = Summary(plan.method)
        stream = await _opened(self._sentences(text, plan, io, summary), io)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = fmt.ChunkWriter(rid, model, True, include_usage, plan.answer.marker())

        async def events() -> AsyncIterator[bytes]:
            status = 499
            try:
                yield writer.first()
                sep = ""
                async for sentence, _ in stream:
                    yield writer.text(sep + sentence)
                    sep = " "
                out = writer.text(notice) if notice else b""
                out += writer.finish("stop")
                if include_usage:
                    out += writer.usage(fmt.usage(summary.prompt_tokens, summary.completion_tokens))
                status = 200
                yield out + fmt.DONE
            finally:
                done(status, summary.prompt_tokens, summary.completion_tokens, provenance=summary.provenance(self._hashes(plan)))
        return SseResponse(events(), headers={**SSE_HEADERS, **headers})



def _fit(text: str, budget: int, count: Callable[[list[str]], list[int]], limit: int | None = None) -> list[str]:
    """``text`` in parts of at most ``budget`` tokens, in order. Sentence counts do not add up
    exactly to the count of the joined text (the white space between sentences has tokens of
    its own), so each part is measured whole and cut again, tighter, until it fits."""
    limit = budget if limit is None else limit
    parts = [p.text for p in chunks(text, limit, count, overhead=0)] or [text]
    out: list[str] = []
    for part, size in zip(parts, count(parts)):
        if size <= budget or limit < 32:
            out.append(part)
        else:
            out.extend(_fit(part, budget, count, int(limit * 0.85)))
    return out


async def _opened(stream: AsyncIterator[Any], io: Io) -> AsyncIterator[Any]:
    """``stream`` with its first item already computed, so that an error before the response
    starts is still an HTTP status; from then on Starlette watches for disconnects."""
    try:
        first = [await stream.__anext__()]
    except StopAsyncIteration:
        first = []
    io.receive = None

    async def chained() -> AsyncIterator[Any]:
        for item in first:
            yield item
        async for item in stream:
            yield item

    return chained()
