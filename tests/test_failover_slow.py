"""A cloud that hangs or crawls, through the real server and the fake cloud (real HTTP both ways):
first-token deadlines, hedged local answers, the breaker's SLOW state and its exit.

The matrix: ``slow`` (first content after a delay) and ``trickle`` (one token every delay) ×
streaming or not × covered (``triage``, deadline 0.4 s) or uncovered (``general``), plus ``hang``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import CHAT_MODEL, FakeCloud, ServerProc, run_server
from tests.test_failover import CLOUD_TEXT, breaker_state, events, sse_payloads, streamed_text


DEADLINE = 0.4


def config_for(cloud: FakeCloud) -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
connect_timeout_s = 1.0
first_byte_timeout_s = 4.0
read_timeout_s = 4.0
probe_interval_s = 0.3
probe_interval_open_s = 0.2
probe_timeout_s = 0.5
failure_threshold = 3
failure_min_calls = 1000
open_base_s = 30.0
slow_floor_s = 0.2

[[workloads]]
name = "triage"
models = ["triage-model"]
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{CHAT_MODEL}"
first_token_deadline_s = {DEADLINE}

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
"""


@pytest.fixture(scope="module")
def srv(cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with run_server(tmp_path_factory.mktemp("slow"), config_for(cloud)) as s:
        yield s


def ask(server: ServerProc, model: str, stream: bool, max_tokens: int = 8) -> tuple[httpx.Response, float]:
    body = {"model": model, "messages": [{"role": "user", "content": "Patient with chest pain."}], "max_tokens": max_tokens,
            "stream": stream}
    t0 = time.monotonic()
    with httpx.Client(timeout=30) as c:
        r = c.post(server.url + "/v1/chat/completions", json=body)
        r.read()
    return r, time.monotonic() - t0


def text_of(r: httpx.Response, stream: bool) -> str:
    return streamed_text(sse_payloads(r.text)) if stream else r.json()["choices"][0]["message"]["content"]


def back_to_normal(server: ServerProc, cloud: FakeCloud, timeout: float = 10.0) -> None:
    """A healthy cloud and a closed breaker (a SLOW one closes when a covered trial is fast)."""
    cloud.set_fault("ok")
    t0 = time.monotonic()
    while (state := breaker_state(server)) != "closed":
        assert time.monotonic() - t0 < timeout, f"breaker stuck in {state}"
        ask(server, "triage-model" if state == "slow" else "gpt-4o", stream=False)
        time.sleep(0.1)


CASES = [(mode, stream) for mode in ("slow", "trickle") for stream in (False, True)]


@pytest.mark.parametrize("mode,stream", CASES, ids=[f"{m}-{'stream' if s else 'json'}" for m, s in CASES])
def test_a_crawling_cloud_is_hedged_for_covered_requests_and_awaited_for_uncovered(srv: ServerProc, cloud: FakeCloud,
                                                                                   mode: str, stream: bool) -> None:
    back_to_normal(srv, cloud)
    delay = 2.0 if mode == "slow" else 1.0
    cloud.set_fault(mode, delay=delay)
    try:
        # covered: the local answer starts at the deadline and wins; only local text, and it says why
        r, took = ask(srv, "triage-model", stream)
        assert r.status_code == 200, r.text
        assert r.headers["x-understudy-route"] == "local"
        assert r.headers["x-understudy-fallback-reason"] == "slow_upstream"
        assert r.headers["x-understudy-model"] == CHAT_MODEL
        text = text_of(r, stream)
        assert text and "cloud" not in text and not CLOUD_TEXT.startswith(text)
        assert took < DEADLINE + 3.0 and took < delay + 1.0
        # uncovered: keeps waiting for the cloud (its own timeouts) and gets the cloud's answer
        r, took = ask(srv, "gpt-4o", stream, max_tokens=3)
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
        assert text_of(r, stream) == "The cloud model"
        assert took >= delay * 0.9
    finally:
        cloud.set_fault("ok")


def test_a_hung_cloud_costs_covered_requests_their_deadline_and_uncovered_ones_a_503(srv: ServerProc, cloud: FakeCloud) -> None:
    back_to_normal(srv, cloud)
    cloud.set_fault("hang")
    try:
        for stream in (False, True):
            r, took = ask(srv, "triage-model", stream)
            assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
            assert r.headers["x-understudy-fallback-reason"] in ("slow_upstream", "circuit_open")
            assert took < DEADLINE + 3.0  # not the 4 s first-byte timeout, and nothing like 60 s
        r, took = ask(srv, "gpt-4o", stream=True)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert took < 4.0 + 1.0  # the first-byte timeout or the breaker opening, whichever first: never a hang
    finally:
        back_to_normal(srv, cloud)


def test_a_slow_cloud_is_ejected_then_taken_back_within_a_probe_interval(srv: ServerProc, cloud: FakeCloud) -> None:
    back_to_normal(srv, cloud)
    for _ in range(8):  # the upstream's own baseline: first tokens in milliseconds
        assert ask(srv, "triage-model", stream=True)[0].headers["x-understudy-route"] == "cloud"
    cloud.set_fault("slow", delay=3.0)
    try:
        for _ in range(2):  # two races lost: the cloud is judged slow
            r, _ = ask(srv, "triage-model", stream=True)
            assert r.headers["x-understudy-fallback-reason"] == "slow_upstream"
        assert breaker_state(srv) == "slow"
        sent = len(cloud.received("/v1/chat/completions"))
        r, took = ask(srv, "triage-model", stream=False)  # local first now, no deadline to wait
        assert r.headers["x-understudy-route"] == "local" and r.headers["x-understudy-fallback-reason"] == "slow_upstream"
        assert took < DEADLINE + 2.0
        assert len(cloud.received("/v1/chat/completions")) - sent <= 1  # at most the one trial
        cloud.set_fault("ok")
        t0 = time.monotonic()
        while True:
            r, _ = ask(srv, "triage-model", stream=True)
            if r.headers["x-understudy-route"] == "cloud":
                break
            assert time.monotonic() - t0 < 3.0, "no failback after the cloud recovered"
        assert time.monotonic() - t0 < 0.2 + 1.5  # one trial interval (probe_interval_open_s) and a request
        assert breaker_state(srv) == "closed"
        transitions = [e["reason"] for e in events(srv, "breaker")]
        assert "closed->slow" in transitions and "slow->closed" in transitions
    finally:
        back_to_normal(srv, cloud)


def test_a_healthy_cloud_is_never_hedged(srv: ServerProc, cloud: FakeCloud) -> None:
    back_to_normal(srv, cloud)
    for stream in (False, True):
        for _ in range(5):
            r, _ = ask(srv, "triage-model", stream)
            assert r.headers["x-understudy-route"] == "cloud" and "x-understudy-fallback-reason" not in r.headers
