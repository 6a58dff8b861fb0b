"""The race between a late cloud and the local answer, with fake backends (no server, no model):
who wins, what is cancelled, what is closed, and that exactly one side's answer comes back."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.failover.race import CloudReady, Outcome, has_content, race
from server.upstream import UpstreamServerError, UpstreamTimeout


class Side:
    """A fake backend: answers after ``delay`` (or fails with ``error``); records cancellation and closing."""

    def __init__(self, name: str, delay: float, error: BaseException | None = None) -> None:
        self.name, self.delay, self.error = name, delay, error
        self.started: float | None = None
        self.cancelled = False
        self.closed = False

    async def run(self) -> "Side":
        self.started = time.monotonic()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return self


def cloud_of(side: Side):  # type: ignore[no-untyped-def]
    async def go() -> CloudReady:
        await side.run()
        ready = CloudReady(0.0, side.delay)
        ready.close = lambda: _close(side)  # type: ignore[method-assign]
        return ready
    return go()


async def _close(side: Side) -> None:
    side.closed = True


def gate_after(deadline: float, allow: bool = True):  # type: ignore[no-untyped-def]
    return lambda elapsed: ("slow_upstream", True) if allow and elapsed >= deadline else None


async def close_local(side: Side) -> None:
    side.closed = True


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_prompt_cloud_wins_and_the_local_side_never_starts() -> None:
    cloud, local = Side("cloud", 0.05), Side("local", 0.01)
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.3), 0.3, time.monotonic, close_local))
    assert out.cloud is not None and out.local is None and not out.hedged
    assert local.started is None


def test_a_late_cloud_loses_to_the_local_answer_and_is_cancelled_at_once() -> None:
    cloud, local = Side("cloud", 5.0), Side("local", 0.05)
    t0 = time.monotonic()
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.2), 0.2, time.monotonic, close_local))
    assert out.local is local and out.cloud is None and out.hedged and out.local_reason == "slow_upstream"
    assert local.started is not None and 0.18 <= local.started - t0 < 0.5  # started at the deadline
    assert cloud.cancelled  # the loser's connection is closed, not left running
    assert out.cloud_lost_after is not None and out.cloud_lost_after >= 0.2 and out.cloud_error is None


def test_a_cloud_that_answers_during_the_hedge_wins_and_the_local_request_is_aborted() -> None:
    cloud, local = Side("cloud", 0.3), Side("local", 5.0)
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.1), 0.1, time.monotonic, close_local))
    assert out.cloud is not None and out.local is None and out.hedged
    assert local.cancelled  # the engine request is aborted: its slot is freed


def test_a_failing_cloud_starts_the_local_answer_at_once_without_waiting_for_the_deadline() -> None:
    cloud, local = Side("cloud", 0.02, UpstreamServerError("500")), Side("local", 0.02)
    t0 = time.monotonic()
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(5.0), 5.0, time.monotonic, close_local))
    assert out.local is local and isinstance(out.cloud_error, UpstreamServerError) and not out.hedged
    assert out.local_reason == "upstream_5xx" and time.monotonic() - t0 < 1.0


def test_when_both_fail_the_local_error_is_raised_and_the_cloud_error_kept() -> None:
    cloud = Side("cloud", 0.3, UpstreamTimeout("late"))
    local = Side("local", 0.01, RuntimeError("local is full"))
    outcome: Outcome[Side] = Outcome()
    with pytest.raises(RuntimeError, match="local is full"):
        run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.05), 0.05, time.monotonic, close_local, outcome=outcome))
    assert isinstance(outcome.cloud_error, UpstreamTimeout)


def test_a_local_failure_during_the_hedge_leaves_the_cloud_to_answer() -> None:
    cloud, local = Side("cloud", 0.3), Side("local", 0.01, RuntimeError("429"))
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.05), 0.05, time.monotonic, close_local))
    assert out.cloud is not None


def test_no_hedge_without_budget_the_request_keeps_waiting_for_the_cloud() -> None:
    cloud, local = Side("cloud", 0.4), Side("local", 0.01)
    out = run(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.05, allow=False), 0.05, time.monotonic, close_local))
    assert out.cloud is not None and local.started is None


def test_a_client_that_disconnects_mid_race_cancels_both_sides() -> None:
    cloud, local = Side("cloud", 5.0), Side("local", 5.0)

    async def go() -> None:
        task = asyncio.ensure_future(race(cloud_of(cloud), lambda r: local.run(), gate_after(0.05), 0.05, time.monotonic, close_local))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert cloud.cancelled and local.cancelled


def test_an_uncovered_request_fails_fast_when_its_breaker_opens() -> None:
    cloud = Side("cloud", 5.0)
    opened_at = time.monotonic() + 0.2

    def fail_fast(elapsed: float) -> BaseException | None:
        return LookupError("breaker open") if time.monotonic() >= opened_at else None

    t0 = time.monotonic()
    with pytest.raises(LookupError):
        run(race(cloud_of(cloud), None, lambda e: None, None, time.monotonic, close_local, fail_fast=fail_fast))
    assert time.monotonic() - t0 < 0.6 and cloud.cancelled


def test_a_loser_that_had_finished_too_is_closed_and_a_running_one_cancelled() -> None:
    """Both sides can be ready in the same wake-up; whichever did not win is closed (its stream
    aborted, its slot freed), and one still running is cancelled."""
    from server.failover.race import _settle

    async def go() -> tuple[Side, Side, Side]:
        winner, finished, running = Side("winner", 0.0), Side("finished", 0.0), Side("running", 5.0)
        done_winner = asyncio.ensure_future(winner.run())
        done_loser = asyncio.ensure_future(finished.run())
        pending = asyncio.ensure_future(running.run())
        await asyncio.sleep(0.01)
        await _settle(done_winner, winner, close_local)
        await _settle(done_loser, winner, close_local)
        await _settle(pending, winner, close_local)
        return winner, finished, running

    winner, finished, running = run(go())
    assert not winner.closed and finished.closed and running.cancelled and not running.closed


def test_only_events_with_content_count_as_the_first_token() -> None:
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
    comment = b": keep-alive\n\n"
    text = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    completion = b'data: {"choices":[{"index":0,"text":"Hi","finish_reason":null}]}\n\n'
    tool = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}\n\n'
    assert not any(has_content(e) for e in (role, usage, comment))
    assert all(has_content(e) for e in (text, finish, completion, tool, b"data: [DONE]\n\n"))
