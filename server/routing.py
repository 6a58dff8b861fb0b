"""Routing: which backend answers a request, failover to the local model, and saying so.

Called by the ``/v1`` handlers on the event loop (``Router.handle``). Per request:

1. **Workload**: the ``X-Workload`` header names one, else the request's ``model`` is looked up
   among the workloads' model names (a workload's own name is one of them). An unknown
   ``X-Workload`` is a 400.
2. **Backend**:
   - no workload and the model is a local model id (or no upstream is configured): local;
   - no workload otherwise: the default upstream, never local (a failure is a 503);
   - a workload: its upstream (or the default); with no upstream configured at all, local.
3. **Failover** (workload with ``fallback = "local"``): when the upstream's breaker is open, or
   the upstream fails before the first byte reaches the client (connect error, timeout, 5xx,
   429, malformed first event), the same HTTP exchange is answered by the workload's
   ``local_model``, with its ``system_prompt`` put first. An uncovered workload gets 503
   ``upstream_unavailable`` with ``Retry-After``. Once bytes of a cloud stream have reached the
   client, nothing is spliced: a broken stream ends with an SSE error event and ``[DONE]``.
   A 4xx from the cloud is the client's answer (relayed; never a failover, never a trip).
4. **Headers** on every answer: ``X-Understudy-Route`` (``cloud``/``local``; ``none`` on a 503),
   ``X-Understudy-Model`` (the model that produced it), ``X-Understudy-Workload`` when one matched,
   and ``X-Understudy-Fallback-Reason`` (``circuit_open``, ``connect_error``, ``timeout``,
   ``upstream_5xx``, ``rate_limited``) when local answered because of the cloud.
5. **Journal**: every decision is recorded (``server.journal``), with no request text.

A request that is served locally after a failover is validated against what the local engine
implements; a parameter it cannot honour (``tools``, ``n`` > 1...) makes the fallback a 503 that
names the parameter, rather than a silently different answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from models.catalog import ModelKind
from server import openai_format as fmt
from server.config import WorkloadConfig
from server.errors import ApiError, InvalidRequest, UpstreamUnavailable
from server.journal import Journal
from server.local import SSE_HEADERS, LocalModels, or_disconnect
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request
from server.sse import ClientGone, SseResponse
from server.workloads.choose import local_answer, summarize_target, summary_plan, triage_model
from server.workloads.summaries import SummariesWorkload, SummarizeRequest
from server.workloads.triage import TriageRequest, TriageWorkload, is_json_template
from server.upstream import (
    Upstream,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamSet,
    UpstreamStream,
)

ROUTE = "X-Understudy-Route"
MODEL = "X-Understudy-Model"
REASON = "X-Understudy-Fallback-Reason"
WORKLOAD = "X-Understudy-Workload"
_INLINE_PREPARE_BYTES = 64 * 1024

@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    schema: type
    prefix: str


CHAT = Endpoint("chat", "chat/completions", ChatCompletionRequest, "chatcmpl")
COMPLETIONS = Endpoint("completions", "completions", CompletionRequest, "cmpl")
EMBEDDINGS = Endpoint("embeddings", "embeddings", EmbeddingRequest, "embd")
TRIAGE = Endpoint("triage", "triage", TriageRequest, "triage")
SUMMARIZE = Endpoint("summarize", "summarize", SummarizeRequest, "summary")
"""``/v1/triage`` and ``/v1/summarize`` are always local: the cloud has no such endpoints."""


@dataclass
class Exchange:
    """One request's routing state, for its headers and its journal line."""

    rid: str
    endpoint: Endpoint
    started: float
    workload: WorkloadConfig | None = None
    upstream: str | None = None
    route: str = "none"
    """The backend chosen (``cloud``/``local``), for the headers of an error answer too."""
    size: int = 0
    recorded: bool = False


class Router:
    def __init__(
        self,
        local: LocalModels,
        upstreams: UpstreamSet,
        workloads: tuple[WorkloadConfig, ...],
        journal: Journal | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.upstreams = upstreams
        self.workloads = {w.name: w for w in workloads}
        self._by_model = {name: w for w in workloads for name in (w.name, *w.models)}
        self.journal = journal
        self._clock = clock
        self.triage = TriageWorkload(local)
        self.summaries = SummariesWorkload(local)

    # -- entry point -----------------------------------------------------------------------------
    def workload_for(self, header: str | None, model: Any) -> WorkloadConfig | None:
        if header:
            wl = self.workloads.get(header.strip())
            if wl is None:
                raise InvalidRequest(f"Unknown workload '{header}' in X-Workload (known: {', '.join(self.workloads) or 'none'}).",
                                     param="X-Workload", code="unknown_workload")
            return wl
        return self._by_model.get(model) if isinstance(model, str) else None

    async def handle(self, endpoint: Endpoint, request: Request, raw: bytes, body: dict[str, Any]) -> Response:
        model = body.get("model")
        ex = Exchange(fmt.new_id(endpoint.prefix), endpoint, self._clock(), size=len(raw))
        try:
            if endpoint is TRIAGE:
                return await self._triage_api(ex, request, body)
            if endpoint is SUMMARIZE:
                return await self._summarize_api(ex, request, body)
            wl = ex.workload = self.workload_for(request.headers.get("x-workload"), model)
            if wl is not None and wl.local_only:
                return await self._local(ex, request, body, wl.local_model, None)
            if wl is None:
                default = self.upstreams.default
                if default is None or not isinstance(model, str) or self.local.registry.get(model) is not None:
                    return await self._local(ex, request, body, model, None)
                return await self._via_upstream(ex, request, raw, body, default)
            upstream = self.upstreams.get(wl.upstream)
            if upstream is None:
                return await self._local(ex, request, body, wl.local_model, None)
            return await self._via_upstream(ex, request, raw, body, upstream)
        except ClientGone:
            self._record(ex, "none", None, "client_gone", 499)
            return Response(status_code=499)
        except ApiError as exc:
            if not ex.recorded:
                self._record(ex, ex.route, None, exc.code or exc.type, exc.status)
            exc.extra_headers.setdefault("X-Request-Id", ex.rid)
            exc.extra_headers.setdefault(ROUTE, ex.route)
            if ex.workload is not None:
                exc.extra_headers.setdefault(WORKLOAD, ex.workload.name)
            raise

    # -- cloud -----------------------------------------------------------------------------------
    async def _via_upstream(self, ex: Exchange, request: Request, raw: bytes, body: dict[str, Any], upstream: Upstream) -> Response:
        ex.upstream = upstream.name
        breaker = upstream.breaker
        if not breaker.try_acquire():
            reason = "rate_limited" if breaker.last_reason == "rate_limited" else "circuit_open"
            return await self._fallback(ex, request, body, upstream, reason)
        try:
            return await self._cloud(ex, request, raw, body, upstream)
        except UpstreamRejected as exc:
            breaker.on_success()
            return self._relay_rejection(ex, upstream, exc, body)
        except UpstreamRateLimited as exc:
            breaker.on_rate_limited(exc.retry_after)
            return await self._fallback(ex, request, body, upstream, exc.reason)
        except UpstreamError as exc:
            breaker.on_failure(exc.reason)
            return await self._fallback(ex, request, body, upstream, exc.reason)
        except BaseException:
            breaker.on_abandon()  # client gone, or a bug: never leave a half-open trial taken
            raise

    def _cloud_payload(self, ex: Exchange, raw: bytes, body: dict[str, Any]) -> tuple[bytes, str | None]:
        wl = ex.workload
        model = body.get("model")
        changes: dict[str, Any] = {}
        if wl is not None and wl.cloud_model and model != wl.cloud_model:
            changes["model"] = model = wl.cloud_model
        if wl is not None and wl.cloud_system_prompt and ex.endpoint is CHAT and isinstance(body.get("messages"), list):
            changes["messages"] = [{"role": "system", "content": wl.cloud_system_prompt}, *body["messages"]]
        if changes:  # re-encoded only when the workload changes something; otherwise the bytes pass as they came
            return json.dumps({**body, **changes}).encode(), model
        return raw, model if isinstance(model, str) else None

    def _headers(self, ex: Exchange, route: str, model: str | None, reason: str | None = None) -> dict[str, str]:
        headers = {ROUTE: route, "X-Request-Id": ex.rid}
        if model:
            headers[MODEL] = model
        if reason:
            headers[REASON] = reason
        if ex.workload is not None:
            headers[WORKLOAD] = ex.workload.name
        return headers

    async def _cloud(self, ex: Exchange, request: Request, raw: bytes, body: dict[str, Any], upstream: Upstream) -> Response:
        ex.route = "cloud"
        content, model = self._cloud_payload(ex, raw, body)
        stream = body.get("stream") is True
        if not stream:
            reply = await or_disconnect(upstream.post(ex.endpoint.path, content), request.receive)
            upstream.breaker.on_success()
            usage = reply.usage or {}
            self._record(ex, "cloud", model, None, reply.status, usage.get("prompt_tokens"), usage.get("completion_tokens"))
            return Response(reply.body, status_code=reply.status, media_type="application/json",
                            headers={**reply.headers, **self._headers(ex, "cloud", model)})
        opened = await or_disconnect(upstream.open_stream(ex.endpoint.path, content), request.receive)
        upstream.breaker.on_success()
        return SseResponse(self._relay(ex, upstream, opened, model),
                           headers={**SSE_HEADERS, **opened.headers, **self._headers(ex, "cloud", model)})

    async def _relay(self, ex: Exchange, upstream: Upstream, stream: UpstreamStream, model: str | None) -> AsyncIterator[bytes]:
        """Relay a cloud stream event by event; a break becomes a terminal error event, never local text."""
        reason = None
        try:
            yield stream.first
            async for event in stream.events():
                yield event
        except UpstreamError as exc:
            reason = exc.reason
            upstream.breaker.on_failure(exc.reason)
            yield fmt.sse_error(
                f"The cloud stream from '{upstream.name}' broke after it had started ({exc.reason}); the answer above is "
                "incomplete. Retry the request.", "upstream_stream_broken") + fmt.DONE
        finally:
            await stream.aclose()
            usage = stream.usage or {}
            self._record(ex, "cloud", model, reason, 200, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                         detail="stream broken" if reason else None)

    def _relay_rejection(self, ex: Exchange, upstream: Upstream, exc: UpstreamRejected, body: dict[str, Any]) -> Response:
        model = body.get("model") if isinstance(body.get("model"), str) else None
        if exc.status in (401, 403):
            # The cloud refused Understudy's own credentials: that is our misconfiguration, and its
            # body may quote the key; the client gets a 502 that says so instead.
            self._record(ex, "cloud", model, "upstream_auth", 502)
            error = {"error": {"message": f"The upstream '{upstream.name}' refused Understudy's credentials "
                               f"({exc.status}); check its api_key_env.", "type": "server_error", "param": None,
                               "code": "upstream_auth_failed"}}
            return JSONResponse(error, status_code=502, headers=self._headers(ex, "cloud", model))
        self._record(ex, "cloud", model, None, exc.status)
        return Response(exc.body, status_code=exc.status, media_type=exc.content_type, headers=self._headers(ex, "cloud", model))

    # -- failover --------------------------------------------------------------------------------
    async def _fallback(self, ex: Exchange, request: Request, body: dict[str, Any], upstream: Upstream, reason: str) -> Response:
        ex.route = "none"
        wl = ex.workload
        if wl is not None and wl.covered:
            return await self._local(ex, request, body, wl.local_model, reason)
        retry = max(1.0, upstream.breaker.retry_after())
        who = f"workload '{wl.name}' has no local fallback" if wl is not None else "this model is only served by the cloud"
        self._record(ex, "none", None, reason, 503)
        raise UpstreamUnavailable(
            f"The upstream '{upstream.name}' is unavailable ({reason}) and {who}. Retry after the indicated delay.",
            retry_after=retry, headers={ROUTE: "none", REASON: reason})

    # -- local -----------------------------------------------------------------------------------
    async def _local(self, ex: Exchange, request: Request, body: dict[str, Any], model_id: Any, reason: str | None) -> Response:
        ex.route = "local"
        endpoint = ex.endpoint
        if isinstance(model_id, str) and body.get("model") != model_id:
            body = {**body, "model": model_id}
        wl = ex.workload
        entry = self.local.registry.get(model_id) if isinstance(model_id, str) else None
        if entry is not None and entry.spec.kind is ModelKind.CLASSIFIER and endpoint is CHAT and wl is not None:
            return await self._classify_chat(ex, request, body, wl, reason)
        if wl is not None and wl.summary_method is not None and endpoint is CHAT:
            return await self._summarize_chat(ex, request, body, wl, reason)
        try:
            req = parse_request(endpoint.schema, body)
            headers = self._headers(ex, "local", req.model, reason)
            done = self._on_local_done(ex, req.model, reason)
            answer = local_answer(wl, req.model, reason)
            if endpoint is EMBEDDINGS:
                out = await self.local.embed(req, req.model, request.receive, answer)
                done(200, out["usage"]["prompt_tokens"], None)
                return JSONResponse(out, headers=headers)
            system = wl.system_prompt if wl is not None else None
            if endpoint is CHAT:
                prepare = functools.partial(self.local.prepare_chat, req, req.model, system)
            else:
                prepare = functools.partial(self.local.prepare_completion, req, req.model)
            # Template and tokenizer run inline for ordinary requests (well under a millisecond);
            # a very large prompt goes to a worker thread so that it cannot stall the event loop.
            gen = prepare() if ex.size < _INLINE_PREPARE_BYTES else await asyncio.to_thread(prepare)
        except InvalidRequest as exc:
            self._cannot_stand_in(ex, reason, exc)
        return await self.local.respond(gen, ex.rid, req.stream, request.receive, headers, answer, done)

    async def _triage_api(self, ex: Exchange, request: Request, body: dict[str, Any]) -> Response:
        ex.route = "local"
        req = parse_request(TriageRequest, body)
        model_id, wl = triage_model(req.model, self.workloads, self._by_model, self.local.registry)
        ex.workload = wl
        answer = local_answer(wl, model_id, None, free_text=False)
        return await self.triage.api(req, model_id, request.receive, answer, self._headers(ex, "local", model_id),
                                     self._on_local_done(ex, model_id, None))

    async def _classify_chat(self, ex: Exchange, request: Request, body: dict[str, Any], wl: WorkloadConfig,
                             reason: str | None) -> Response:
        model_id = wl.local_model
        assert model_id is not None
        if body.get("response_format") == {"type": "json_object"} and is_json_template(wl.output_template):
            body = {k: v for k, v in body.items() if k != "response_format"}  # the template's JSON satisfies it
        try:
            req = parse_request(ChatCompletionRequest, {**body, "model": model_id})
            answer = local_answer(wl, model_id, reason, free_text=False)
            return await self.triage.chat(req, model_id, wl.output_template, ex.rid, request.receive, answer,
                                          self._headers(ex, "local", model_id, reason), self._on_local_done(ex, model_id, reason))
        except InvalidRequest as exc:
            self._cannot_stand_in(ex, reason, exc)

    # -- summaries -------------------------------------------------------------------------------
    async def _summarize_api(self, ex: Exchange, request: Request, body: dict[str, Any]) -> Response:
        """``/v1/summarize``: the plan comes from ``server.workloads.choose.summarize_target``."""
        ex.route = "local"
        req = parse_request(SummarizeRequest, body)
        try:
            plan, ex.workload = summarize_target(req.model, req.method, req.max_words, self.workloads, self._by_model,
                                                 self.local.registry)
        except LookupError:
            self.local.resolve(req.model or "", ModelKind.CHAT)  # 404 for an unknown model, 400 naming its kind
            raise
        return await self.summaries.api(req, plan, request.receive, self._headers(ex, "local", plan.model),
                                        self._on_local_done(ex, plan.model, None))

    async def _summarize_chat(self, ex: Exchange, request: Request, body: dict[str, Any], wl: WorkloadConfig,
                              reason: str | None) -> Response:
        try:
            fmt_ = body.get("response_format")
            if fmt_ not in (None, {"type": "text"}):
                raise InvalidRequest("A summaries workload answers in plain text; response_format is not supported.",
                                     param="response_format")
            req = parse_request(ChatCompletionRequest, {**body, "model": wl.local_model})
            plan = summary_plan(wl, None, None, reason, self.local.registry)
            return await self.summaries.chat(req, plan, ex.rid, request.receive, self._headers(ex, "local", plan.model, reason),
                                             self._on_local_done(ex, plan.model, reason))
        except InvalidRequest as exc:
            self._cannot_stand_in(ex, reason, exc)

    def _cannot_stand_in(self, ex: Exchange, reason: str | None, exc: InvalidRequest) -> NoReturn:
        """A request the local stand-in cannot take. Served locally by choice: the client's 400.
        After a failover it was valid for the cloud (a parameter the local engine does not
        implement, a prompt longer than its context...): the cloud is what is missing, so a 503."""
        if reason is None:
            raise exc
        ex.route = "none"
        raise UpstreamUnavailable(
            f"The cloud is unavailable ({reason}) and the local fallback cannot serve this request: {exc.message}",
            retry_after=max(1.0, self._retry_hint(ex)), headers={ROUTE: "none", REASON: reason}) from None

    def _retry_hint(self, ex: Exchange) -> float:
        upstream = self.upstreams.get(ex.upstream) if ex.upstream else None
        return upstream.breaker.retry_after() if upstream is not None else 1.0

    def _on_local_done(self, ex: Exchange, model: str, reason: str | None) -> Callable[..., None]:
        def done(status: int, prompt: int | None, completion: int | None, provenance: str | None = None) -> None:
            self._record(ex, "local", model, reason, status, prompt, completion, provenance=provenance)
        return done

    # -- journal ---------------------------------------------------------------------------------
    def _record(self, ex: Exchange, route: str, model: str | None, reason: str | None, status: int,
                prompt: int | None = None, completion: int | None = None, detail: str | None = None,
                provenance: str | None = None) -> None:
        ex.recorded = True
        if self.journal is None:
            return
        self.journal.record_route(
            request_id=ex.rid, endpoint=ex.endpoint.name, workload=ex.workload.name if ex.workload else None,
            upstream=ex.upstream, route=route, model=model, reason=reason, status=status,
            latency_ms=(self._clock() - ex.started) * 1000, prompt_tokens=prompt, completion_tokens=completion, detail=detail,
            provenance=provenance)
