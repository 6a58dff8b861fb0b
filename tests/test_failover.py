"""Cloud failover through the real server and a fake cloud on loopback (real HTTP both ways).

The matrix: every fault of the fake cloud × streaming or not × covered (``triage``, falls back to
the local model) or uncovered (``general``, 503). The breaker threshold is high on this server so
each case shows its own reason; breaker opening, probing and failback have their own server.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT_MODEL, FakeCloud, ServerProc, run_server


UPSTREAM_KEY = "sk-upstream-SECRET-4242"
CLIENT_KEY = "client-key-never-forwarded"
CLOUD_TEXT = "The cloud model says hello"


def config_for(cloud: FakeCloud, threshold: int, open_base: float = 1.0, first_byte: float = 1.5) -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
api_key_env = "TEST_CLOUD_KEY"
connect_timeout_s = 1.0
first_byte_timeout_s = {first_byte}
read_timeout_s = 1.0
probe_interval_s = 0.3
probe_interval_open_s = 0.2
probe_timeout_s = 0.5
failure_threshold = {threshold}
failure_min_calls = 1000
open_base_s = {open_base}

[[workloads]]
name = "triage"
models = ["triage-model"]
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{CHAT_MODEL}"
system_prompt = "You are a careful triage assistant."

[[workloads]]
name = "general"
models = ["gpt-4o", "echo-auth", "invalid-for-cloud", "odd-usage"]
fallback = "none"
"""


@pytest.fixture(scope="module")
def srv(cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with run_server(tmp_path_factory.mktemp("failover"), config_for(cloud, threshold=1000), env={"TEST_CLOUD_KEY": UPSTREAM_KEY}) as s:
        yield s


def breaker_state(server: ServerProc) -> str:
    return server.status()["upstreams"]["cloud"]["breaker"]


def wait_closed(server: ServerProc, cloud: FakeCloud, timeout: float = 10.0) -> None:
    cloud.set_fault("ok")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = breaker_state(server)
        if state == "closed":
            return
        if state == "half_open":  # when the probes never saw the fault, a real request is the trial
            ask(server, "gpt-4o", stream=False)
        time.sleep(0.05)
    raise AssertionError("breaker did not close")


def ask(server: ServerProc, workload_model: str, stream: bool, timeout: float = 30.0) -> httpx.Response:
    body = {"model": workload_model, "messages": [{"role": "user", "content": "Patient with chest pain."}], "max_tokens": 8, "stream": stream}
    with httpx.Client(timeout=timeout) as c:
        r = c.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        r.read()
        return r


def sse_payloads(text: str) -> list[object]:
    out: list[object] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(payloads: list[object]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if isinstance(p, dict) and p.get("choices"))


# fault, set_fault kwargs, reason when it fails before the first byte
BEFORE_FIRST_BYTE = [
    ("refuse", {}, "connect_error"),
    ("blackhole", {}, "timeout"),
    ("hang", {}, "timeout"),
    ("status-500", {"status": 500}, "upstream_5xx"),
    ("status-502", {"status": 502}, "upstream_5xx"),
    ("status-503", {"status": 503}, "upstream_5xx"),
    ("status-429", {"status": 429, "retry_after": 1}, "rate_limited"),
    ("cut-0", {"after": 0}, "connect_error"),
    ("malformed-0", {"after": 0}, "upstream_5xx"),
]


STREAM_ONLY = ("cut", "malformed")  # these faults exist only in a streaming answer
CASES = [(f, kw, r, stream) for f, kw, r in BEFORE_FIRST_BYTE for stream in (False, True)
         if stream or f.split("-")[0] not in STREAM_ONLY]


@pytest.mark.parametrize("fault,kwargs,reason,stream", CASES, ids=[f"{c[0]}-{'stream' if c[3] else 'json'}" for c in CASES])
def test_fault_before_first_byte(srv: ServerProc, cloud: FakeCloud, fault: str, kwargs: dict, reason: str, stream: bool) -> None:
    mode = fault.split("-")[0]
    wait_closed(srv, cloud)
    cloud.set_fault(mode, **kwargs)
    try:
        # covered: answered locally in the same exchange, and it says why
        started = time.monotonic()
        r = ask(srv, "triage-model", stream)
        assert r.status_code == 200, r.text
        assert r.headers["x-understudy-route"] == "local"
        assert r.headers["x-understudy-fallback-reason"] == reason
        assert r.headers["x-understudy-model"] == CHAT_MODEL
        assert r.headers["x-understudy-workload"] == "triage"
        if stream:
            payloads = sse_payloads(r.text)
            assert payloads[-1] == "[DONE]" and all(p["model"] == CHAT_MODEL for p in payloads if isinstance(p, dict))
            assert CLOUD_TEXT not in streamed_text(payloads)
        else:
            assert r.json()["model"] == CHAT_MODEL and r.json()["choices"][0]["message"]["content"]
        assert time.monotonic() - started < 1.5 + 10  # first-byte timeout + local answer
        if mode == "status" and kwargs["status"] == 429:
            wait_closed(srv, cloud)
            cloud.set_fault(mode, **kwargs)
        # uncovered: a 503 with Retry-After and the reason, never a hang
        started = time.monotonic()
        r = ask(srv, "gpt-4o", stream)
        assert time.monotonic() - started < 1.5 + 1.0
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "upstream_unavailable" and reason in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-understudy-fallback-reason"] == reason
        assert r.headers["x-understudy-route"] == "none"
    finally:
        cloud.set_fault("ok")


MID_STREAM = [("cut", "connect_error"), ("stall", "timeout"), ("malformed", "upstream_5xx")]


@pytest.mark.parametrize("model", ["triage-model", "gpt-4o"], ids=["covered", "uncovered"])
@pytest.mark.parametrize("fault,reason", MID_STREAM, ids=[f[0] for f in MID_STREAM])
def test_stream_breaking_after_bytes_were_sent_ends_cleanly_without_splicing(srv: ServerProc, cloud: FakeCloud, fault: str, reason: str, model: str) -> None:
    wait_closed(srv, cloud)
    cloud.set_fault(fault, after=3)
    try:
        r = ask(srv, model, stream=True)
        assert r.status_code == 200
        assert r.headers["x-understudy-route"] == "cloud"
        assert "x-understudy-fallback-reason" not in r.headers
        payloads = sse_payloads(r.text)
        assert payloads[-1] == "[DONE]"
        error = payloads[-2]
        assert isinstance(error, dict) and error["error"]["code"] == "upstream_stream_broken"
        text = streamed_text(payloads[:-2])
        assert text and CLOUD_TEXT.startswith(text)  # only cloud text, only what the cloud sent
        assert all(p.get("model") != CHAT_MODEL for p in payloads if isinstance(p, dict) and "model" in p)
    finally:
        cloud.set_fault("ok")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_healthy_cloud_is_passed_through_with_headers(srv: ServerProc, cloud: FakeCloud, stream: bool) -> None:
    wait_closed(srv, cloud)
    before = len(cloud.received("/v1/chat/completions"))
    r = ask(srv, "triage-model", stream)
    assert r.status_code == 200
    assert r.headers["x-understudy-route"] == "cloud"
    assert r.headers["x-understudy-model"] == "gpt-4o-mini"
    assert "x-understudy-fallback-reason" not in r.headers
    text = streamed_text(sse_payloads(r.text)) if stream else r.json()["choices"][0]["message"]["content"]
    assert text.startswith("The cloud model")
    sent = cloud.received("/v1/chat/completions")[before:]
    assert len(sent) == 1
    assert sent[0].body["model"] == "gpt-4o-mini"  # the workload's cloud_model
    assert sent[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in json.dumps(sent[0].headers)


def test_request_matching_no_workload_goes_to_the_default_upstream_only(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    r = ask(srv, "some-cloud-only-model", stream=False)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
    cloud.set_fault("refuse")
    try:
        r = ask(srv, "some-cloud-only-model", stream=False)
        assert r.status_code == 503 and r.headers["x-understudy-route"] == "none"
    finally:
        cloud.set_fault("ok")


def test_local_model_ids_are_still_served_locally(srv: ServerProc) -> None:
    r = ask(srv, CHAT_MODEL, stream=False)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
    assert "x-understudy-fallback-reason" not in r.headers


def test_x_workload_header_picks_the_workload(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    cloud.set_fault("refuse")
    try:
        body = {"model": "anything", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"X-Workload": "triage"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"X-Workload": "nope"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Workload"
    finally:
        cloud.set_fault("ok")


def test_cloud_4xx_is_relayed_and_never_trips_or_fails_over(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    for _ in range(5):
        r = ask(srv, "invalid-for-cloud", stream=False)
        assert r.status_code == 400 and r.headers["x-understudy-route"] == "cloud"
        assert r.json()["error"]["param"] == "model"
    assert breaker_state(srv) == "closed"


def test_an_odd_upstream_answer_is_relayed_and_leaves_the_breaker_usable(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    for _ in range(4):
        r = ask(srv, "odd-usage", stream=False)
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
    assert breaker_state(srv) == "closed"


def test_upstream_key_never_comes_back_nor_reaches_the_log(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    r = ask(srv, "echo-auth", stream=False)
    assert r.status_code == 400
    assert UPSTREAM_KEY not in r.text and "[redacted]" in r.text
    assert UPSTREAM_KEY not in json.dumps(dict(r.headers))
    r = httpx.get(srv.url + "/admin/status")
    assert UPSTREAM_KEY not in r.text
    assert UPSTREAM_KEY not in srv.log()


def test_local_fallback_refuses_what_it_cannot_honour(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    cloud.set_fault("refuse")
    try:
        body = {"model": "triage-model", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and "tools" in r.json()["error"]["message"]
        assert "retry-after" in r.headers
    finally:
        cloud.set_fault("ok")


def test_embeddings_and_completions_pass_through(srv: ServerProc, cloud: FakeCloud) -> None:
    wait_closed(srv, cloud)
    r = httpx.post(srv.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a", "b"]}, timeout=30)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud" and len(r.json()["data"]) == 2
    r = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-4o", "prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
    models = {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
    assert {"gpt-4o-mini", "triage", "triage-model", CHAT_MODEL} <= models


# -- breaker, prober, failback, journal: their own server with a low threshold ----------------------

@pytest.fixture
def tight(cloud: FakeCloud, tmp_path: Path) -> Iterator[ServerProc]:
    cloud.set_fault("ok")
    with run_server(tmp_path, config_for(cloud, threshold=3, open_base=30.0), env={"TEST_CLOUD_KEY": UPSTREAM_KEY}) as s:
        yield s
    cloud.set_fault("ok")


def events(server: ServerProc, kind: str) -> list[dict]:
    return httpx.get(server.url + f"/admin/events?kind={kind}&limit=1000").json()["data"]


def test_breaker_opens_then_requests_go_local_without_touching_the_cloud(tight: ServerProc, cloud: FakeCloud) -> None:
    cloud.set_fault("status", status=503, only_path="/v1/chat/completions")
    reasons = [ask(tight, "triage-model", stream=False).headers["x-understudy-fallback-reason"] for _ in range(5)]
    # the probes' GET /models still succeeds, so it is exactly the three failed requests that open it
    assert reasons == ["upstream_5xx"] * 3 + ["circuit_open"] * 2
    sent = len(cloud.received("/v1/chat/completions"))
    for _ in range(3):
        r = ask(tight, "triage-model", stream=True)
        assert r.headers["x-understudy-fallback-reason"] == "circuit_open"
    assert len(cloud.received("/v1/chat/completions")) == sent


def test_prober_notices_an_outage_without_traffic_and_failback_follows_recovery(tight: ServerProc, cloud: FakeCloud) -> None:
    cloud.set_fault("refuse")
    t0 = time.monotonic()
    while breaker_state(tight) != "open":
        assert time.monotonic() - t0 < 5.0, "prober did not open the breaker"
        time.sleep(0.05)
    detected = time.monotonic() - t0
    assert detected < 0.3 + 3 * 0.2 + 1.0
    r = ask(tight, "triage-model", stream=False)
    assert r.headers["x-understudy-fallback-reason"] == "circuit_open"
    cloud.set_fault("ok")
    t1 = time.monotonic()
    while True:
        r = ask(tight, "triage-model", stream=False)
        if r.headers["x-understudy-route"] == "cloud":
            break
        assert time.monotonic() - t1 < 5.0, "no failback although the cloud is back (open_base is 30 s)"
        time.sleep(0.05)
    transitions = [e["reason"] for e in reversed(events(tight, "breaker"))]
    assert transitions[:3] == ["closed->open", "open->half_open", "half_open->closed"]


def test_429_holds_traffic_for_its_retry_after_even_when_probes_succeed(tight: ServerProc, cloud: FakeCloud) -> None:
    cloud.set_fault("status", status=429, retry_after=4, count=1, only_path="/v1/chat/completions")
    t0 = time.monotonic()
    r = ask(tight, "triage-model", stream=False)
    assert r.headers["x-understudy-fallback-reason"] == "rate_limited"
    assert breaker_state(tight) == "open"
    r = ask(tight, "triage-model", stream=False)
    assert r.headers["x-understudy-fallback-reason"] == "rate_limited" and r.headers["x-understudy-route"] == "local"
    r = ask(tight, "gpt-4o", stream=False)
    assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 4
    while ask(tight, "triage-model", stream=False).headers["x-understudy-route"] != "cloud":
        assert time.monotonic() - t0 < 8
        time.sleep(0.1)
    assert time.monotonic() - t0 >= 4.0


def test_journal_holds_every_decision_after_a_hard_kill(tight: ServerProc, cloud: FakeCloud) -> None:
    ids = [ask(tight, "triage-model", stream=False).headers["x-request-id"]]
    cloud.set_fault("refuse")
    ids.append(ask(tight, "triage-model", stream=True).headers["x-request-id"])
    ids.append(ask(tight, "gpt-4o", stream=False).headers["x-request-id"])
    deadline = time.monotonic() + 5
    while not {e["request_id"] for e in events(tight, "route")} >= set(ids):
        assert time.monotonic() < deadline, "decisions not journaled"
        time.sleep(0.05)
    os.kill(tight.process.pid, signal.SIGKILL)
    tight.process.wait(10)
    db = Path(tight.config_path.parent / "state" / "journal.sqlite3")
    conn = sqlite3.connect(db)
    rows = {r[0]: r for r in conn.execute("SELECT request_id, workload, route, reason, status, latency_ms FROM events WHERE kind='route'")}
    conn.close()
    assert rows[ids[0]][1:5] == ("triage", "cloud", None, 200)
    assert rows[ids[1]][1:5] == ("triage", "local", "connect_error", 200)
    assert rows[ids[2]][1:3] == ("general", "none") and rows[ids[2]][4] == 503
    assert rows[ids[2]][3] in ("connect_error", "circuit_open")  # the prober may have opened it by then
    assert all(rows[i][5] > 0 for i in ids)


def test_without_upstreams_a_workload_is_simply_local(start_server) -> None:  # type: ignore[no-untyped-def]
    config = f"""
[[workloads]]
name = "summaries"
models = ["summarizer"]
fallback = "local"
local_model = "{CHAT_MODEL}"
system_prompt = "Summarise clinical notes in two sentences."
"""
    with start_server(config) as s:
        r = ask(s, "summarizer", stream=False)
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
        assert "x-understudy-fallback-reason" not in r.headers
        assert r.json()["model"] == CHAT_MODEL
