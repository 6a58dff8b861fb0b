"""A canary patient identifier through every path a request can take: it must appear in no log
line (JSON logs at debug level), not in the journal's files, and not in ``/metrics``.

Paths: local success (plain and streamed), cloud success, each 4xx (bad parameter, unknown
model, too long, bad JSON), a cloud 5xx relayed, a cloud that hangs (timeout, then failover), a
cloud that refuses (failover), a client that disconnects mid-stream, and a crash inside a
handler (in-process: there is no way to make the real server crash on purpose)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, FakeCloud, run_server

CANARY = "Canary-Patient-ZQX-93817"
NOTE = f"Patient {CANARY}, NHS 943 476 5919, chest pain radiating to the left arm since this morning."


def config(cloud: FakeCloud) -> str:
    return f"""
[server]
log_level = "debug"
log_format = "json"

[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
first_byte_timeout_s = 1.0
read_timeout_s = 1.0
probe_interval_s = 0.3
probe_interval_open_s = 0.2
failure_threshold = 1000
failure_min_calls = 1000

[[workloads]]
name = "notes"
models = ["notes-model"]
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{CHAT_MODEL}"

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
"""


def chat(model: str, content: str = NOTE, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def test_the_canary_reaches_no_log_no_journal_file_and_no_metric(cloud: FakeCloud, tmp_path: Path) -> None:
    with run_server(tmp_path / "srv", config(cloud)) as srv:
        post = lambda path, body, **kw: httpx.post(srv.url + path, json=body, timeout=60, **kw)  # noqa: E731
        assert post("/v1/chat/completions", chat(CHAT_MODEL)).status_code == 200
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=chat(CHAT_MODEL, stream=True), timeout=60) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        assert post("/v1/chat/completions", chat("notes-model")).status_code == 200  # the cloud answers
        assert post("/v1/chat/completions", chat(CHAT_MODEL, temperature=CANARY)).status_code == 400
        assert post("/v1/chat/completions", chat("invalid-for-cloud")).status_code == 400  # the cloud's 400, relayed
        assert post("/v1/chat/completions", chat(CHAT_MODEL, content=NOTE * 800)).status_code == 400
        bad = httpx.post(srv.url + "/v1/chat/completions", content=b'{"messages": "' + CANARY.encode() + b'"', timeout=10)
        assert bad.status_code == 400
        assert post("/v1/embeddings", {"model": EMBED_MODEL, "input": [NOTE, 17]}).status_code == 400
        assert post("/v1/triage", {"input": NOTE}).status_code == 200
        assert post("/v1/summarize", {"input": NOTE * 3}).status_code == 200
        cloud.set_fault("status", status=500, count=1, only_path="/v1/chat/completions")
        assert post("/v1/chat/completions", chat("gpt-4o")).status_code == 503  # the cloud's 500: uncovered, a 503
        cloud.set_fault("hang", only_path="/v1/chat/completions")
        assert post("/v1/chat/completions", chat("gpt-4o")).status_code in (503, 504)  # timeout, uncovered
        timed_out = post("/v1/chat/completions", chat("notes-model"))  # timeout, then the local answer
        assert timed_out.status_code == 200 and timed_out.headers["x-understudy-route"] == "local"
        cloud.set_fault("refuse")
        failed_over = post("/v1/chat/completions", chat("notes-model", stream=True))
        assert failed_over.status_code == 200 and failed_over.headers["x-understudy-route"] == "local"
        cloud.set_fault("ok")

        async def hang_up() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("POST", srv.url + "/v1/chat/completions",
                                         json=chat(CHAT_MODEL, stream=True, max_tokens=200)) as r:
                    async for _ in r.aiter_bytes():
                        break  # the client goes away after the first bytes
        asyncio.run(hang_up())
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        events = httpx.get(srv.url + "/admin/events?limit=1000", timeout=10).json()["data"]
        assert len(events) >= 14 and any(e["status"] == 499 for e in events)
        log = srv.log()
    state = tmp_path / "srv" / "state"
    journal = b"".join(p.read_bytes() for p in state.glob("journal.sqlite3*"))
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(1 for line in lines if line.get("msg") == "request") >= 14  # one structured line per request
    assert any(line.get("route") == "local" and line.get("reason") for line in lines)  # failovers are logged
    for where, text in (("log", log), ("metrics", metrics), ("events", json.dumps(events))):
        assert CANARY not in text and "943 476" not in text, where
    assert CANARY.encode() not in journal and b"943 476" not in journal


def test_a_crash_inside_a_handler_logs_its_frames_but_not_its_message(caplog: pytest.LogCaptureFixture) -> None:
    from server.logs import JsonFormatter, TextFormatter

    logger = logging.getLogger("understudy.http")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    try:
        for formatter in (JsonFormatter(), TextFormatter()):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
            try:
                raise ValueError(f"could not parse {NOTE}")
            except ValueError as exc:
                from server.app import crash_response

                response = crash_response(exc, "POST", "/v1/chat/completions")
            logger.removeHandler(handler)
            assert response.status_code == 500 and CANARY.encode() not in response.body
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "ValueError" in out and "test_canary.py" in out  # the frames are there...
    assert CANARY not in out  # ...the message is not
