"""Upstream client and prober without a network: ``httpx.MockTransport`` and a fake clock."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.breaker import BreakerConfig, BreakerState
from server.config import UpstreamConfig
from server.prober import Prober
from server.upstream import (
    Upstream,
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)

KEY = "sk-test-upstream-key"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def upstream(handler, clock: Clock | None = None, **kw: float) -> Upstream:  # type: ignore[no-untyped-def]
    config = UpstreamConfig(name="cloud", base_url="http://cloud.test/v1", api_key=KEY, first_byte_timeout_s=kw.pop("first_byte", 1.0),
                            read_timeout_s=kw.pop("read", 1.0), breaker=BreakerConfig(failure_threshold=3, jitter=0.0, open_base_s=10))
    return Upstream(config, clock=clock or Clock(), transport=httpx.MockTransport(handler))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_request_carries_only_the_upstream_key_and_the_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    async def go() -> None:
        up = upstream(handler)
        reply = await up.post("chat/completions", b'{"model":"m"}')
        assert reply.status == 200 and reply.usage == {"prompt_tokens": 3, "completion_tokens": 1}
        await up.aclose()

    run(go())
    (req,) = seen
    assert req.url == "http://cloud.test/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(req.content) == {"model": "m"}
    assert "x-workload" not in req.headers and "cookie" not in req.headers


@pytest.mark.parametrize("status,error", [(500, UpstreamServerError), (503, UpstreamServerError), (429, UpstreamRateLimited), (400, UpstreamRejected)])
def test_status_codes_are_classified(status: int, error: type) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"Retry-After": "7"}, json={"error": {"message": f"bad key {KEY}"}})

    async def go() -> None:
        up = upstream(handler)
        with pytest.raises(error) as info:
            await up.post("chat/completions", b"{}")
        if status == 429:
            assert info.value.retry_after == 7.0
        if status == 400:
            assert KEY.encode() not in info.value.body and b"[redacted]" in info.value.body
        await up.aclose()

    run(go())


def test_connect_error_and_timeouts_are_classified() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={})

    async def go() -> None:
        up = upstream(refuse)
        with pytest.raises(UpstreamConnectError):
            await up.post("chat/completions", b"{}")
        assert await up.probe() == ("connect_error", None)
        await up.aclose()
        up = upstream(slow, first_byte=0.05)
        with pytest.raises(UpstreamTimeout):
            await up.post("chat/completions", b"{}")
        await up.aclose()

    run(go())


def sse(*events: str) -> bytes:
    return b"".join(f"data: {e}\n\n".encode() for e in events)


def test_stream_first_event_then_the_rest_validated() -> None:
    body = sse('{"choices":[{"delta":{"content":"a"}}]}', '{"choices":[{"delta":{"content":"b"}}]}',
               '{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}', "[DONE]")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go() -> list[bytes]:
        up = upstream(handler)
        s = await up.open_stream("chat/completions", b"{}")
        events = [s.first] + [e async for e in s.events()]
        await s.aclose()
        await up.aclose()
        assert s.usage == {"prompt_tokens": 2, "completion_tokens": 2}
        return events

    events = run(go())
    assert b"".join(events) == body


def test_malformed_or_truncated_streams_raise() -> None:
    async def go(content: bytes, error: type) -> None:
        up = upstream(lambda r: httpx.Response(200, content=content))
        with pytest.raises(error):
            s = await up.open_stream("chat/completions", b"{}")
            async for _ in s.events():
                pass
        await up.aclose()

    run(go(b"data: {not json\n\n", UpstreamServerError))
    run(go(b"garbage line\n\n", UpstreamServerError))
    run(go(sse('{"a":1}', '{"b":2}'), UpstreamConnectError))  # ended without [DONE]
    run(go(sse('{"a":1}') + b'data: {"trunc', UpstreamConnectError))
    run(go(b"", UpstreamConnectError))


def test_prober_opens_on_outage_and_closes_on_recovery_with_a_fake_clock() -> None:
    clock = Clock()
    state = {"up": True}
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not state["up"]:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"data": []})

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)
        clock.t += s

    async def go() -> None:
        up = upstream(handler, clock)
        prober = Prober(up, sleep=fake_sleep)
        assert prober.interval() == up.config.probe_interval_s
        await prober.probe_once()
        assert up.breaker.state is BreakerState.CLOSED
        state["up"] = False
        for _ in range(3):
            await prober.probe_once()
        assert up.breaker.state is BreakerState.OPEN
        assert prober.interval() == up.config.probe_interval_open_s
        assert await prober.probe_once() is False  # still down: stays open
        state["up"] = True
        assert await prober.probe_once() is True  # open -> half-open, trial follows at once
        assert up.breaker.state is BreakerState.HALF_OPEN
        await prober.probe_once()
        assert up.breaker.state is BreakerState.CLOSED
        assert clock.t == 0.0  # nothing slept: the fake clock only moved when told
        await up.aclose()

    run(go())


def test_prober_does_not_take_the_trial_when_it_never_saw_the_outage() -> None:
    clock = Clock()

    async def go() -> None:
        up = upstream(lambda r: httpx.Response(200, json={"data": []}), clock)
        prober = Prober(up)
        for _ in range(3):
            up.breaker.on_failure("upstream_5xx")  # completions failing, /models fine
        assert up.breaker.state is BreakerState.OPEN
        assert await prober.probe_once() is False
        assert up.breaker.state is BreakerState.OPEN  # a healthy /models proves nothing here
        clock.t += 11
        assert up.breaker.state is BreakerState.HALF_OPEN
        await prober.probe_once()
        assert up.breaker.state is BreakerState.HALF_OPEN
        assert up.breaker.try_acquire()  # the trial is left to a real request
        await up.aclose()

    run(go())
