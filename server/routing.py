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
5. **Events**: every decision is published once (``server.events``: the journal, metrics and the request log consume it), with no request text.

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
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from models.catalog import ModelKind
from server import openai_format as fmt
from server.breaker import BreakerState, CircuitBreaker
from server.config import WorkloadConfig
from server.drain import cut_here
from server.errors import ApiError, InvalidRequest, UpstreamUnavailable
from server.events import EventBus
from server.failover.attempt import Attempt
from server.failover.health import Health
from server.failover.planner import First, LocalLoad, choose, may_hedge
from server.failover.race import CloudReady, Gate, Outcome, cloud_first_content, race
from server.local import SSE_HEADERS, LocalModels, Receive
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request
from server.shadow import Shadow, answer_text, delta_text, user_text
from server.sse import ClientGone, DisconnectWatch, SseResponse
from server.workloads.choose import local_answer, summarize_target, summary_plan, triage_model
from server.workloads.summaries import SummariesWorkload, SummarizeRequest
from server.upstream import Upstream, UpstreamError, UpstreamRejected, UpstreamSet
from server.workloads.triage import TriageRequest, TriageWorkload, is_json_template

ROUTE = "X-Understudy-Route"
MODEL = "X-Understudy-Model"
REASON = "X-Understudy-Fallback-Reason"
WORKLOAD = "X-Understudy-Workload"
_INLINE_PREPARE_BYTES = 64 * 1024


async def _close_response(response: Response) -> None:
    """A local answer that lost the race after it was ready: abort its stream (frees the slot)."""
    body = getattr(response, "body_iterator", None)
    if body is not None:
        await body.aclose()

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
    key_id: str | None = None
    """The API key's id (``server.keys``), never the key."""


class Router:
    def __init__(
        self,
        local: LocalModels,
        upstreams: UpstreamSet,
        workloads: tuple[WorkloadConfig, ...],
        events: EventBus | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.upstreams = upstreams
        self.workloads = {w.name: w for w in workloads}
        self._by_model = {name: w for w in workloads for name in (w.name, *w.models)}
        self.events = events
        self._clock = clock
        self.triage = TriageWorkload(local)
        self.summaries = SummariesWorkload(local)
        self.health = {name: Health(u.breaker, u.config.slow, clock) for name, u in upstreams.by_name.items()}
        self._hedges: dict[str, int] = {}
        """Speculative local answers running now, per local model (the hedge budget's count)."""
        self.stats = {"covered_cloud_attempts": 0, "hedged": 0, "hedges_won_by_local": 0}
        self.shadow = Shadow(local, self.summaries, events)
        self.drilled: set[str] = set()
        """Covered workloads a drill answers locally as if their upstream were down (``server.drill``)."""

    def failover_status(self) -> dict[str, Any]:
        """For ``/admin/status``: the hedging counters and each covered workload's current deadlines."""
        deadlines: dict[str, dict[str, float]] = {}
        for wl in self.workloads.values():
            upstream = self.upstreams.get(wl.upstream) if wl.covered and not wl.local_only else None
            if upstream is not None and upstream.name in self.health:
                health = self.health[upstream.name]
                deadlines[wl.name] = {kind: round(health.deadline(wl.hedge, wl.name, streamed), 3)
                                      for kind, streamed in (("stream", True), ("json", False))}
        return {**self.stats, "first_token_deadline_s": deadlines}

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
        key = request.scope.get("understudy.key")
        ex = Exchange(fmt.new_id(endpoint.prefix), endpoint, self._clock(), size=len(raw), key_id=key.id if key else None)
        try:
            if endpoint is TRIAGE:
                return await self._triage_api(ex, request, body)
            if endpoint is SUMMARIZE:
                return await self._summarize_api(ex, request, body)
            wl = ex.workload = self.workload_for(request.headers.get("x-workload"), model)
            if wl is not None and wl.local_only:
                return await self._local(ex, request.receive, body, wl.local_model, None)
            if wl is None:
                default = self.upstreams.default
                if default is None or not isinstance(model, str) or self.local.registry.get(model) is not None:
                    return await self._local(ex, request.receive, body, model, None)
                return await self._via_upstream(ex, request, raw, body, default)
            upstream = self.upstreams.get(wl.upstream)
            if upstream is None:
                return await self._local(ex, request.receive, body, wl.local_model, None)
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
        wl = ex.workload
        covered = wl is not None and wl.covered
        if covered and wl.name in self.drilled:
            return await self._fallback(ex, request.receive, body, upstream, "drill")
        state = breaker.state
        # Only a request that could use it asks for a trial (asking may hand it out).
        acquired = breaker.try_acquire() if covered or state is not BreakerState.SLOW else False
        choice = choose(covered, state, acquired, breaker.open_reason())
        if choice.first is not First.CLOUD:
            assert choice.reason is not None
            return await self._fallback(ex, request.receive, body, upstream, choice.reason)
        attempt = Attempt(breaker)
        try:
            with DisconnectWatch(request.receive):
                return await self._cloud(ex, raw, body, upstream, attempt, choice.trial)
        finally:
            attempt.abandon()  # a client gone, a lost race or a bug: never leave a trial taken

    async def _cloud(self, ex: Exchange, raw: bytes, body: dict[str, Any], upstream: Upstream, attempt: Attempt,
                     trial: bool) -> Response:
        """The cloud attempt; for a covered workload, raced against the local answer when the
        cloud misses its first-token deadline or fails (``server.failover.race``)."""
        ex.route = "cloud"
        content, model = self._cloud_payload(ex, raw, body)
        streamed = body.get("stream") is True
        wl = ex.workload
        health = self.health[upstream.name]
        breaker = upstream.breaker
        covered = wl is not None and wl.covered
        cloud = cloud_first_content(upstream, ex.endpoint.path, content, streamed, self._clock)
        outcome: Outcome[Response] = Outcome()
        try:
            if covered:
                assert wl is not None
                deadline = health.deadline(wl.hedge, wl.name, streamed)
                outcome = await race(cloud, lambda reason: self._local(ex, None, body, wl.local_model, reason),
                                     self._gate(wl, breaker, deadline, trial), deadline, self._clock, _close_response,
                                     on_hedge_end=functools.partial(self._hedge_ended, wl.local_model), outcome=outcome)
            else:
                outcome = await race(cloud, None, None, None, self._clock, _close_response,
                                     fail_fast=functools.partial(self._refuse_if_open, ex, upstream), outcome=outcome)
        except UpstreamError as exc:  # uncovered: the cloud failed (a 503 follows)
            attempt.failed(exc)
            return await self._fallback(ex, None, body, upstream, exc.reason)
        except BaseException:
            if isinstance(outcome.cloud_error, UpstreamError):
                attempt.failed(outcome.cloud_error)
            raise
        finally:
            if covered:
                self.stats["covered_cloud_attempts"] += 1
                self.stats["hedged"] += outcome.hedged
                self.stats["hedges_won_by_local"] += outcome.hedged and outcome.local is not None
        if outcome.cloud is not None:
            ready = outcome.cloud
            ex.route = "cloud"
            health.observe(wl.name if wl else None, streamed, ready.first_content_s, censored=False, trial=trial)
            attempt.succeeded()
            if ready.rejected is not None:
                return self._relay_rejection(ex, upstream, ready.rejected, body)
            shadow = (wl, text) if covered and self.shadow.wanted(wl) and (text := user_text(body)) else None
            return self._cloud_response(ex, upstream, ready, model, shadow)
        assert outcome.local is not None
        if isinstance(outcome.cloud_error, UpstreamError):
            attempt.failed(outcome.cloud_error)
        elif outcome.cloud_lost_after is not None:
            health.observe(wl.name if wl else None, streamed, outcome.cloud_lost_after, censored=True, trial=trial)
        return outcome.local

    def _gate(self, wl: WorkloadConfig, breaker: CircuitBreaker, deadline: float, trial: bool) -> Gate:
        """When a covered request's local side starts while its cloud attempt runs: at once if the
        breaker opens meanwhile (a failover); past the deadline, as a hedge within the budget, or
        without budget when the upstream is already judged slow (the local answer is then the
        workload's normal answer, not a speculation)."""
        model = wl.local_model
        assert model is not None

        def gate(elapsed: float) -> tuple[str, bool] | None:
            state = breaker.state
            if state in (BreakerState.OPEN, BreakerState.HALF_OPEN) and not trial:
                return breaker.open_reason(), False
            if elapsed < deadline:
                return None
            if trial or state is BreakerState.SLOW:
                return "slow_upstream", False
            if may_hedge(wl.hedge, self._local_load(model)):
                self._hedges[model] = self._hedges.get(model, 0) + 1
                return "slow_upstream", True
            return None

        return gate

    def _local_load(self, model_id: str) -> LocalLoad:
        load = self.local.client.load(model_id)
        return LocalLoad(slots=load.slots if load else 0, waiting=load.waiting if load else 0,
                         hedges=self._hedges.get(model_id, 0))

    def _hedge_ended(self, model_id: str | None) -> None:
        if model_id is not None and self._hedges.get(model_id):
            self._hedges[model_id] -= 1

    def _refuse_if_open(self, ex: Exchange, upstream: Upstream, elapsed: float) -> ApiError | None:
        """An uncovered request still waiting for its cloud when the breaker opens: a 503 now."""
        if upstream.breaker.state is not BreakerState.OPEN:
            return None
        reason = upstream.breaker.open_reason()
        ex.route = "none"
        self._record(ex, "none", None, reason, 503)
        return UpstreamUnavailable(
            f"The upstream '{upstream.name}' became unavailable while this request waited ({reason}) and this request "
            "has no local fallback. Retry after the indicated delay.",
            retry_after=max(1.0, upstream.breaker.retry_after()), headers={ROUTE: "none", REASON: reason})

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

    def _cloud_response(self, ex: Exchange, upstream: Upstream, ready: CloudReady, model: str | None,
                        shadow: tuple[WorkloadConfig, str] | None) -> Response:
        """``shadow`` (workload, user text): hand the finished cloud answer to shadow mode once it
        has been sent (a background task after the body, or the end of the relayed stream)."""
        headers = self._headers(ex, "cloud", model)
        if ready.reply is not None:
            reply = ready.reply
            usage = reply.usage or {}
            self._record(ex, "cloud", model, None, reply.status, usage.get("prompt_tokens"), usage.get("completion_tokens"))
            after = None
            if shadow is not None and (cloud_text := answer_text(reply.body)) is not None:
                after = BackgroundTask(self.shadow.after_answer, shadow[0], shadow[1], cloud_text)
            return Response(reply.body, status_code=reply.status, media_type="application/json", headers={**reply.headers, **headers},
                            background=after)
        assert ready.stream is not None
        return SseResponse(self._relay(ex, upstream, ready, model, shadow), headers={**SSE_HEADERS, **ready.stream.headers, **headers})

    async def _relay(self, ex: Exchange, upstream: Upstream, ready: CloudReady, model: str | None,
                     shadow: tuple[WorkloadConfig, str] | None = None) -> AsyncIterator[bytes]:
        """Relay a cloud stream event by event; a break becomes a terminal error event, never local text."""
        stream = ready.stream
        assert stream is not None
        reason = None
        text: list[str] | None = [delta_text(e) for e in ready.events] if shadow is not None else None
        try:
            yield b"".join(ready.events)
            async for event in stream.events():
                if text is not None:
                    text.append(delta_text(event))
                yield event
            if shadow is not None and text is not None:
                self.shadow.submit(shadow[0], shadow[1], "".join(text))
        except UpstreamError as exc:
            reason = exc.reason
            upstream.breaker.on_failure(exc.reason)
            yield fmt.sse_error(
                f"The cloud stream from '{upstream.name}' broke after it had started ({exc.reason}); the answer above is "
                "incomplete. Retry the request.", "upstream_stream_broken") + fmt.DONE
        finally:
            await stream.aclose()
            usage = stream.usage or {}
            reason = "server_shutting_down" if reason is None and cut_here() else reason
            self._record(ex, "cloud", model, reason, 200, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                         detail="stream broken" if reason else None, ttft_s=ready.first_content_s)

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
    async def _fallback(self, ex: Exchange, receive: Receive | None, body: dict[str, Any], upstream: Upstream, reason: str) -> Response:
        ex.route = "none"
        wl = ex.workload
        if wl is not None and wl.covered:
            return await self._local(ex, receive, body, wl.local_model, reason)
        retry = max(1.0, upstream.breaker.retry_after())
        who = f"workload '{wl.name}' has no local fallback" if wl is not None else "this model is only served by the cloud"
        self._record(ex, "none", None, reason, 503)
        raise UpstreamUnavailable(
            f"The upstream '{upstream.name}' is unavailable ({reason}) and {who}. Retry after the indicated delay.",
            retry_after=retry, headers={ROUTE: "none", REASON: reason})

    # -- local -----------------------------------------------------------------------------------
    async def _local(self, ex: Exchange, receive: Receive | None, body: dict[str, Any], model_id: Any, reason: str | None) -> Response:
        ex.route = "local"
        endpoint = ex.endpoint
        if isinstance(model_id, str) and body.get("model") != model_id:
            body = {**body, "model": model_id}
        wl = ex.workload
        entry = self.local.registry.get(model_id) if isinstance(model_id, str) else None
        if entry is not None and entry.spec.kind is ModelKind.CLASSIFIER and endpoint is CHAT and wl is not None:
            return await self._classify_chat(ex, receive, body, wl, reason)
        if wl is not None and wl.summary_method is not None and endpoint is CHAT:
            return await self._summarize_chat(ex, receive, body, wl, reason)
        try:
            req = parse_request(endpoint.schema, body)
            headers = self._headers(ex, "local", req.model, reason)
            done = self._on_local_done(ex, req.model, reason)
            answer = local_answer(wl, req.model, reason)
            if endpoint is EMBEDDINGS:
                out = await self.local.embed(req, req.model, receive, answer)
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
        return await self.local.respond(gen, ex.rid, req.stream, receive, headers, answer, done)

    async def _triage_api(self, ex: Exchange, request: Request, body: dict[str, Any]) -> Response:
        ex.route = "local"
        req = parse_request(TriageRequest, body)
        model_id, wl = triage_model(req.model, self.workloads, self._by_model, self.local.registry)
        ex.workload = wl
        answer = local_answer(wl, model_id, None, free_text=False)
        return await self.triage.api(req, model_id, request.receive, answer, self._headers(ex, "local", model_id),
                                     self._on_local_done(ex, model_id, None))

    async def _classify_chat(self, ex: Exchange, receive: Receive | None, body: dict[str, Any], wl: WorkloadConfig,
                             reason: str | None) -> Response:
        model_id = wl.local_model
        assert model_id is not None
        if body.get("response_format") == {"type": "json_object"} and is_json_template(wl.output_template):
            body = {k: v for k, v in body.items() if k != "response_format"}  # the template's JSON satisfies it
        try:
            req = parse_request(ChatCompletionRequest, {**body, "model": model_id})
            answer = local_answer(wl, model_id, reason, free_text=False)
            return await self.triage.chat(req, model_id, wl.output_template, ex.rid, receive, answer,
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

    async def _summarize_chat(self, ex: Exchange, receive: Receive | None, body: dict[str, Any], wl: WorkloadConfig,
                              reason: str | None) -> Response:
        try:
            fmt_ = body.get("response_format")
            if fmt_ not in (None, {"type": "text"}):
                raise InvalidRequest("A summaries workload answers in plain text; response_format is not supported.",
                                     param="response_format")
            req = parse_request(ChatCompletionRequest, {**body, "model": wl.local_model})
            plan = summary_plan(wl, None, None, reason, self.local.registry)
            return await self.summaries.chat(req, plan, ex.rid, receive, self._headers(ex, "local", plan.model, reason),
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
        def done(status: int, prompt: int | None, completion: int | None, provenance: str | None = None,
                 ttft_s: float | None = None, itl_s: float | None = None) -> None:
            self._record(ex, "local", model, reason, status, prompt, completion, provenance=provenance, ttft_s=ttft_s, itl_s=itl_s)
        return done

    # -- events ----------------------------------------------------------------------------------
    def _record(self, ex: Exchange, route: str, model: str | None, reason: str | None, status: int,
                prompt: int | None = None, completion: int | None = None, detail: str | None = None,
                provenance: str | None = None, ttft_s: float | None = None, itl_s: float | None = None) -> None:
        ex.recorded = True
        if self.events is None:
            return
        self.events.record_route(
            request_id=ex.rid, endpoint=ex.endpoint.name, workload=ex.workload.name if ex.workload else None,
            upstream=ex.upstream, route=route, model=model, reason=reason, status=status,
            latency_ms=(self._clock() - ex.started) * 1000, prompt_tokens=prompt, completion_tokens=completion, detail=detail,
            provenance=provenance, key_id=ex.key_id, ttft_ms=None if ttft_s is None else ttft_s * 1000,
            itl_ms=None if itl_s is None else itl_s * 1000)
