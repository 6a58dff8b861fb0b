"""Executing a cloud attempt, with a local answer raced against it when the cloud is late.

Called on the event loop by the router (``server.routing``); the decisions it needs come in as
plain values and callables (deadline, ``gate``), so the mechanics here are tested with fake
backends (``tests/test_failover_race.py``) and the policy in ``server.failover.planner``.

- ``cloud_first_content`` sends the request and returns once the cloud has produced *content*:
  for a stream, the events up to and including the first one with content (role-only chunks,
  usage-only chunks and comments are held back, not counted); for a non-streamed request, the
  whole answer. Any ``UpstreamError`` is the attempt's failure.
- ``race`` waits for the cloud; when ``gate`` says so (the deadline passed and the hedge budget
  allows it, or the breaker opened meanwhile), it starts the local side *in parallel*. The first
  side with content wins; the other is cancelled at once (its HTTP response closed, or its
  engine request aborted and its slot freed) and closed if it had finished too. Text from two
  backends is never mixed: the winner's answer is the whole answer.
- Every way out (a win, both failing, the client going away, a bug) cancels and closes what is
  still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from server.upstream import Upstream, UpstreamConnectError, UpstreamRejected, UpstreamReply, UpstreamStream

L = TypeVar("L")

#: How often a waiting race re-asks ``gate`` (the breaker may open, the hedge budget free up).
POLL_S = 0.1


@dataclass
class CloudReady:
    """The cloud produced content: a stream with its first events, or a whole reply."""

    started: float
    first_content_s: float
    stream: UpstreamStream | None = None
    events: list[bytes] = field(default_factory=list)
    reply: UpstreamReply | None = None
    rejected: UpstreamRejected | None = None
    """A 4xx: the cloud's answer to this request (relayed; never a failover)."""

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


def has_content(event: bytes) -> bool:
    """Whether an SSE event carries answer content: text, a tool call, a refusal, a finish, the
    end of the stream, or an error. Role-only, usage-only and comment events do not."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True  # not ours to judge: relay it as the cloud's answer
        if not isinstance(payload, dict):
            return True
        if "error" in payload:
            return True
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason") or choice.get("text"):
                return True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
                                            or delta.get("function_call")):
                return True
    return False


async def cloud_first_content(upstream: Upstream, path: str, content: bytes, streamed: bool,
                              clock: Callable[[], float]) -> CloudReady:
    """Raises ``UpstreamError`` (the attempt failed). Cancelling it closes the connection."""
    started = clock()
    try:
        if not streamed:
            reply = await upstream.post(path, content)
            return CloudReady(started, clock() - started, reply=reply)
        stream = await upstream.open_stream(path, content)
    except UpstreamRejected as exc:
        return CloudReady(started, clock() - started, rejected=exc)
    try:
        events = [stream.first]
        while not has_content(events[-1]):
            event = await stream.next_event(upstream.config.read_timeout_s)
            if event is None:
                raise UpstreamConnectError(f"{upstream.name} ended the stream without any content")
            events.append(event)
    except BaseException:
        await stream.aclose()
        raise
    return CloudReady(started, clock() - started, stream=stream, events=events)


@dataclass
class Outcome(Generic[L]):
    """How a race ended: exactly one of ``cloud`` and ``local`` is set."""

    cloud: CloudReady | None = None
    local: L | None = None
    cloud_error: BaseException | None = None
    """Why the cloud did not win, when it failed (None when it was merely late, or won)."""
    local_reason: str | None = None
    """Why the local side was started (``slow_upstream``, or the breaker's reason)."""
    hedged: bool = False
    """The local side was started while the cloud attempt was still running."""
    cloud_lost_after: float | None = None
    """Seconds the cloud attempt had run when the local answer won (a censored latency)."""


Gate = Callable[[float], "tuple[str, bool] | None"]
"""What the race asks while the cloud has not answered: start the local side now? Given the
seconds since the cloud attempt started, the reason to start it and whether that start is a
hedge (counted against the budget), or None to keep waiting."""


async def race(cloud: Awaitable[CloudReady], start_local: Callable[[str], Awaitable[L]] | None, gate: Gate | None,
               deadline: float | None, clock: Callable[[], float], close_local: Callable[[L], Awaitable[None]],
               on_hedge_end: Callable[[], None] | None = None, fail_fast: Callable[[float], BaseException | None] | None = None,
               outcome: Outcome[L] | None = None) -> Outcome[L]:
    """Run ``cloud``; start ``start_local(reason)`` when ``gate`` allows it (or at once when the
    cloud fails, if there is a local side; no local side and no gate for an uncovered request). Returns the first side with content. Raises the
    cloud's error when there is no local side, the local side's error when both failed, or what
    ``fail_fast(elapsed)`` returns (an uncovered request whose upstream's breaker opened).
    ``outcome`` (filled in as the race goes) lets the caller see the cloud's error after a raise."""
    t0 = clock()
    cloud_task: asyncio.Future[CloudReady] = asyncio.ensure_future(cloud)
    local_task: asyncio.Future[L] | None = None
    outcome = outcome if outcome is not None else Outcome()
    local_error: BaseException | None = None
    hedge_open = False

    def start(reason: str, hedge: bool) -> None:
        nonlocal local_task, hedge_open
        assert start_local is not None
        outcome.local_reason = reason
        outcome.hedged = not cloud_task.done()
        hedge_open = hedge
        local_task = asyncio.ensure_future(start_local(reason))

    try:
        while True:
            if cloud_task.done() and outcome.cloud_error is None:
                error = cloud_task.exception()
                if error is None:
                    outcome.cloud = cloud_task.result()
                    return outcome
                outcome.cloud_error = error
                if start_local is None:
                    raise error
                if local_task is None:
                    start(getattr(error, "reason", "upstream_error"), hedge=False)
            if local_task is not None and local_task.done() and local_error is None:
                error = local_task.exception()
                if error is None:
                    outcome.local = local_task.result()
                    if not cloud_task.done():
                        outcome.cloud_lost_after = clock() - t0
                    return outcome
                local_error = error
            if local_error is not None and outcome.cloud_error is not None:
                raise local_error
            elapsed = clock() - t0
            if fail_fast is not None:
                refusal = fail_fast(elapsed)
                if refusal is not None:
                    raise refusal
            if local_task is None and start_local is not None and gate is not None:
                decision = gate(elapsed)
                if decision is not None:
                    start(*decision)
                    continue
            waiting = [t for t in (cloud_task, local_task) if t is not None and not t.done()]
            timeout = POLL_S
            if deadline is not None and local_task is None and elapsed < deadline:
                timeout = min(timeout, deadline - elapsed)
            if start_local is None and fail_fast is None:
                timeout = None
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if hedge_open and on_hedge_end is not None:
            on_hedge_end()
        await _settle(cloud_task, outcome.cloud, CloudReady.close)
        if local_task is not None:
            await _settle(local_task, outcome.local, close_local)


async def _settle(task: asyncio.Future[Any], winner: Any, close: Callable[[Any], Awaitable[None]]) -> None:
    """Cancel a side that did not win; close its result if it had finished anyway."""
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        return
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if result is not winner:
        try:
            await close(result)
        except Exception:
            pass
