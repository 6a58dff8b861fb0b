"""Serving a request with a local model over HTTP: validation, rendering, disconnects.

Called on the event-loop thread by the router (``server.routing``), for local model ids and for
workloads served by their local model. Model work goes through ``models.client.LocalClient``
(no HTTP there); this module maps its errors to OpenAI's, renders OpenAI bodies and streams, and
cancels a request whose client disconnects. Never blocks on the model: the chat template and the
tokenizer run inline for ordinary prompts (the router sends very large ones to a worker thread),
everything else is awaited.

Every local answer says so in its body too (clinical front-ends often drop headers): a top-level
``"understudy": {"route": "local", "model", "reason"}`` in a JSON body, and in the last chunk of a
stream (``LocalAnswer.marker``). A workload's ``local_notice`` is appended to free text.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.responses import JSONResponse, Response

from models.bridge import Channel, Delta, Final
from models.catalog import ModelKind
from models.client import LocalClient, ModelLookupError, ModelNotReady, UnknownModel, WrongKind
from models.engine_base import EngineFailure, EngineOverloaded, EngineStopped, InputTooLong, QueueTimedOut
from models.jsonmode import JSON_OBJECT_GBNF, closing
from models.priority import Priority
from models.registry import ModelEntry
from models.sequence import SamplingParams
from server import openai_format as fmt
from server.drain import cut_here
from server.errors import (
    ApiError,
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    QueueTimeout,
)
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from server.sse import DisconnectWatch, SseResponse

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Done = Callable[..., None]
"""``done(status, prompt_tokens, completion_tokens, *, ttft_s=None, itl_s=None)``."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Generation:
    entry: ModelEntry
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    chat: bool
    include_usage: bool


@dataclass(frozen=True)
class LocalAnswer:
    """How a local answer is labelled and queued: who answered and why, the queue class, and
    the visible line a workload appends to free text (None: nothing appended)."""

    model: str
    reason: str | None = None
    priority: int = Priority.NORMAL
    notice: str | None = None

    def marker(self) -> dict[str, Any]:
        return {"route": "local", "model": self.model, "reason": self.reason}


def engine_error(exc: BaseException | None) -> ApiError:
    """Map an engine-side failure (``Final.error``) to what the client sees."""
    if isinstance(exc, QueueTimedOut):
        return QueueTimeout(f"The request waited too long for a free slot ({exc}). Retry later.", retry_after=1.0)
    if isinstance(exc, EngineStopped):
        return ModelUnavailable("The model is shutting down.", retry_after=5.0)
    if isinstance(exc, InputTooLong):
        return ContextLengthExceeded(str(exc), param="input")
    if isinstance(exc, EngineFailure):
        return InternalError("The local model failed while generating. The request was not completed.")
    if isinstance(exc, EngineOverloaded):
        return Overloaded(f"The local model is at capacity ({exc}). Retry after the indicated delay.", retry_after=exc.retry_after)
    return InternalError("Internal error.")


def lookup_error(exc: ModelLookupError) -> ApiError:
    """Map ``LocalClient.lookup``'s refusal to what the client sees."""
    if isinstance(exc, UnknownModel):
        return ModelNotFound(exc.model_id)
    if isinstance(exc, WrongKind):
        use = {ModelKind.EMBEDDING: "/v1/embeddings", ModelKind.CHAT: "/v1/chat/completions or /v1/completions",
               ModelKind.CLASSIFIER: "/v1/triage (or a workload over /v1/chat/completions)"}[exc.kind]
        return InvalidRequest(f"The model '{exc.model_id}' is a {exc.kind.value} model; use {use}.", param="model",
                              code="model_not_supported")
    assert isinstance(exc, ModelNotReady)
    message = str(exc)
    return ModelUnavailable(message[:1].upper() + message[1:], retry_after=None if exc.final else 5.0)


def watching(receive: Receive | None) -> contextlib.AbstractContextManager[Any]:
    """Watch for a disconnect over a block (no-op without ``receive``): ``ClientGone`` out of it."""
    return DisconnectWatch(receive) if receive is not None else contextlib.nullcontext()


class LocalModels:
    def __init__(self, client: LocalClient) -> None:
        self.client = client
        self.registry = client.registry

    def resolve(self, model_id: str, kind: ModelKind) -> ModelEntry:
        try:
            return self.client.lookup(model_id, kind)
        except ModelLookupError as exc:
            raise lookup_error(exc) from None

    # -- chat and completions ----------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest, model_id: str, system_prompt: str | None = None) -> Generation:
        entry = self.resolve(model_id, ModelKind.CHAT)
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            prompt = entry.llm.render_chat(messages)
        except Exception as exc:  # the template raised (e.g. raise_exception for a role order)
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from None
        tokens = entry.llm.tokenize(prompt)
        grammar = response_grammar(req, entry)
        return self._generation(entry, tokens, req.completion_limit(), req, chat=True, what="messages", grammar=grammar)

    def prepare_completion(self, req: CompletionRequest, model_id: str) -> Generation:
        entry = self.resolve(model_id, ModelKind.CHAT)
        tokens = entry.llm.tokenize(req.prompt_text())
        if not tokens:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        return self._generation(entry, tokens, req.completion_limit(), req, chat=False, what="prompt")

    def _generation(self, entry: ModelEntry, tokens: list[int], limit: int | None, req: Any, chat: bool, what: str,
                    grammar: str | None = None) -> Generation:
        context = entry.context_length
        n = len(tokens)
        if n >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, your {what} resulted in "
                f"{n} tokens. Please reduce the length of the {what}.", param=what)
        if limit is not None and n + limit > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you requested {n + limit} "
                f"tokens ({n} in the {what}, {limit} in the completion). Please reduce the length of the "
                f"{what} or completion.", param="max_tokens")
        sampling = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            grammar=grammar,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Generation(entry, tokens, limit if limit is not None else context - n, sampling, req.stop_list(), chat, include_usage)

    def submit(self, gen: Generation, priority: int = Priority.NORMAL) -> Channel:
        with _admission(gen.entry):
            return self.client.submit(gen.entry, gen.prompt_tokens, gen.max_tokens, gen.sampling, gen.stop, priority)

    async def complete(self, gen: Generation, channel: Channel, rid: str, receive: Receive | None,
                       answer: LocalAnswer) -> dict[str, Any]:
        parts: list[str] = []
        try:
            with watching(receive):
                final = None
                while final is None:
                    for item in await channel.get():
                        if isinstance(item, Delta):
                            parts.append(item.text)
                        elif isinstance(item, Final):
                            final = item
        finally:
            channel.cancel()  # a no-op once answered; frees the slot of a client that went away
        if final.error is not None:
            raise engine_error(final.error)
        if gen.sampling.grammar is not None and final.finish_reason == "length":
            parts.append(closing("".join(parts)))  # cut JSON still parses (finish_reason says length)
        if answer.notice:
            parts.append(answer.notice)
        use = fmt.usage(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        body = fmt.completion_body(gen.chat, rid, gen.entry.id, "".join(parts), final.finish_reason or "stop", use)
        body["understudy"] = answer.marker()
        return body

    async def first_items(self, channel: Channel, receive: Receive | None) -> list[Any]:
        """Wait for the first output so that a queue timeout can still be an HTTP status."""
        try:
            with watching(receive):
                items = await channel.get()
        except BaseException:
            channel.cancel()
            raise
        for item in items:
            if isinstance(item, Final) and item.error is not None:
                raise engine_error(item.error)
        return items

    async def respond(self, gen: Generation, rid: str, stream: bool, receive: Receive | None,
                      headers: dict[str, str], answer: LocalAnswer, done: Done | None = None) -> Response:
        """Submit ``gen`` and answer: a JSON body, or an SSE stream once the first output exists
        (so that a queue timeout can still be an HTTP status). ``done(status, prompt, completion)``
        is called once the answer is complete (at the end of the stream when streaming)."""
        started = time.monotonic()
        channel = self.submit(gen, answer.priority)
        if not stream:
            body = await self.complete(gen, channel, rid, receive, answer)
            if done is not None:
                use = body["usage"]
                done(200, use["prompt_tokens"], use["completion_tokens"])
            return JSONResponse(body, headers=headers)
        first = await self.first_items(channel, receive)
        return SseResponse(self.stream(gen, channel, rid, first, answer, done, started), headers={**SSE_HEADERS, **headers})

    async def stream(self, gen: Generation, channel: Channel, rid: str, first: list[Any], answer: LocalAnswer,
                     done: Done | None = None, started: float | None = None) -> AsyncIterator[bytes]:
        """SSE body. Closing the generator (client gone) cancels the request. ``done`` also gets
        the time to the first text and the mean time between tokens (``ttft_s``, ``itl_s``)."""
        writer = fmt.ChunkWriter(rid, gen.entry.id, gen.chat, gen.include_usage, answer.marker())
        final: Final | None = None
        first_at = last_at = None
        sent: list[str] | None = [] if gen.sampling.grammar is not None else None  # JSON mode: kept to close a cut answer
        try:
            head = writer.first()
            items = first
            while True:
                text = "".join(i.text for i in items if isinstance(i, Delta))
                out = head
                head = b""
                if text:
                    last_at = time.monotonic()
                    first_at = first_at or last_at
                    out += writer.text(text)
                    if sent is not None:
                        sent.append(text)
                final = next((i for i in items if isinstance(i, Final)), None)
                if final is not None:
                    if sent is not None and final.error is None and final.finish_reason == "length":
                        out += writer.text(closing("".join(sent)))
                    if answer.notice and final.error is None:
                        out += writer.text(answer.notice)
                    if final.error is not None:
                        err = engine_error(final.error)
                        out += fmt.sse_error(err.message, err.code or "error", err.type)
                    else:
                        out += writer.finish(final.finish_reason or "stop")
                        if writer.include_usage:
                            out += writer.usage(fmt.usage(final.prompt_tokens, final.completion_tokens, final.cached_tokens))
                    yield out + fmt.DONE
                    return
                if out:
                    yield out
                items = await channel.get()
        finally:
            channel.cancel()
            if done is not None:
                ttft = first_at - started if first_at is not None and started is not None else None
                n = final.completion_tokens if final is not None else 0
                itl = (last_at - first_at) / (n - 1) if first_at is not None and last_at is not None and n > 1 else None
                if final is None:  # the client went away, or the drain ended the stream (server.drain)
                    done(503 if cut_here() else 499, None, None, ttft_s=ttft, itl_s=itl)
                elif final.error is not None:
                    done(engine_error(final.error).status, final.prompt_tokens, final.completion_tokens, ttft_s=ttft, itl_s=itl)
                else:
                    done(200, final.prompt_tokens, final.completion_tokens, ttft_s=ttft, itl_s=itl)

    # -- embeddings --------------------------------------------------------------------------------
    async def embed(self, req: EmbeddingRequest, model_id: str, receive: Receive | None, answer: LocalAnswer) -> dict[str, Any]:
        entry = self.resolve(model_id, ModelKind.EMBEDDING)
        dims = entry.settings.get("dimensions")
        if req.dimensions is not None and req.dimensions != dims:
            raise InvalidRequest(f"This model produces {dims} dimensions; 'dimensions' cannot change that.", param="dimensions", code="unsupported_value")
        result = await self.call(self.client.embed(model_id, req.inputs(), answer.priority), receive)
        body = _embedding_body(entry.id, result.vectors, result.tokens, req.encoding_format)
        body["understudy"] = answer.marker()
        return body

    async def call(self, awaitable: Awaitable[T], receive: Receive | None) -> T:
        """Await a ``LocalClient`` call, cancelling it if the HTTP client disconnects, with the
        client's errors as API errors."""
        try:
            with watching(receive):
                return await awaitable
        except ModelLookupError as exc:
            raise lookup_error(exc) from None
        except (EngineOverloaded, QueueTimedOut, EngineStopped, InputTooLong, EngineFailure) as exc:
            raise engine_error(exc) from None


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


@functools.lru_cache(maxsize=128)
def _schema_grammar(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    # The converter's string characters admit raw control characters (a newline inside a
    # string), which JSON does not: narrow them as llama.cpp's own JSON grammar does.
    return json_schema_to_gbnf(schema_json).replace(_LOOSE_CHAR, _JSON_CHAR)


MAX_SCHEMA_REPEAT = 4096
"""The largest ``maxLength``/``maxItems``/... a schema for local generation may ask for: the
converter spells a bound out as nested optional repetitions, and from about 20,000 llama.cpp's
grammar parser overflows the stack (a crash of the whole server, found by fuzzing)."""
_REPEAT_KEYS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties", "maxContains", "minContains")


def _check_repetitions(schema: Any, param: str) -> None:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in _REPEAT_KEYS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= MAX_SCHEMA_REPEAT:
                    raise InvalidRequest(f"The JSON schema's {key} is above {MAX_SCHEMA_REPEAT}, more than local generation "
                                         "can enforce.", param=param, code="invalid_value")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def response_grammar(req: ChatCompletionRequest, entry: ModelEntry) -> str | None:
    """The GBNF grammar that enforces ``response_format`` with llama.cpp's grammar sampler, so a
    local JSON answer always parses (unless ``max_tokens`` cuts it: ``finish_reason`` is then
    ``length``, as at OpenAI). None for plain text."""
    fmt_ = req.response_format
    if fmt_ is None or fmt_.type == "text":
        return None
    if fmt_.type == "json_object":
        return JSON_OBJECT_GBNF
    assert fmt_.json_schema is not None
    schema = fmt_.json_schema.schema_ if fmt_.json_schema.schema_ is not None else {"type": "object"}
    param = "response_format.json_schema.schema"
    _check_repetitions(schema, param)
    try:
        grammar = _schema_grammar(json.dumps(schema, sort_keys=True))
    except Exception as exc:  # the converter's refusals are ValueError, KeyError, NotImplementedError...
        raise InvalidRequest(f"The JSON schema cannot be turned into a grammar for local generation "
                             f"({type(exc).__name__}).", param=param, code="invalid_value") from None
    if not entry.llm.grammar_ok(grammar):
        raise InvalidRequest("The JSON schema gives a grammar that llama.cpp refuses.", param=param, code="invalid_value")
    return grammar


@contextlib.contextmanager
def _admission(entry: ModelEntry) -> Iterator[None]:
    """An engine's refusal at submit time, as the client sees it (429 or 503)."""
    try:
        yield
    except EngineOverloaded as exc:
        raise Overloaded(f"The local model '{entry.id}' is at capacity ({exc}). Retry after the indicated delay.",
                         retry_after=exc.retry_after) from None
    except EngineStopped:
        raise ModelUnavailable(f"The model '{entry.id}' is shutting down.", retry_after=5.0) from None


def _embedding_body(model: str, vectors: np.ndarray, tokens: int, encoding: str) -> dict[str, Any]:
    if encoding == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
