"""The outage drill through the real server and the fake cloud (real HTTP both ways): start,
automatic restore, abort, the maximum duration, a second drill refused, the API key, the
workloads mode, the CLI, and a report whose numbers are the journal's."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT_MODEL, ROOT, FakeCloud, ServerProc, run_server


KEY = "drill-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def config_for(cloud: FakeCloud) -> str:
    return f"""
[server]
api_key_env = "DRILL_TEST_KEYS"
max_drill_s = 30

[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
probe_interval_s = 0.3
probe_interval_open_s = 0.2

[[workloads]]
name = "triage"
models = ["triage-model"]
fallback = "local"
local_model = "triage-minilm"

[[workloads]]
name = "notes"
fallback = "local"
local_model = "{CHAT_MODEL}"
target_p95_s = 20

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
"""


@pytest.fixture(scope="module")
def srv(cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with run_server(tmp_path_factory.mktemp("drill"), config_for(cloud), env={"DRILL_TEST_KEYS": KEY}) as s:
        yield s


def ask(server: ServerProc, model: str, text: str = "Crushing chest pain and sweating.") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def breaker(server: ServerProc) -> str:
    return httpx.get(server.url + "/admin/status", headers=AUTH).json()["upstreams"]["cloud"]["breaker"]


def wait_finished(server: ServerProc, drill_id: str, timeout: float = 20.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = httpx.get(server.url + "/admin/drill", headers=AUTH).json()
        if status["running"] is None and status["last"] and status["last"]["id"] == drill_id:
            return status["last"]
        time.sleep(0.1)
    raise AssertionError("the drill did not end by itself")


def test_a_drill_takes_the_cloud_down_then_restores_it_by_itself_and_reports_what_the_journal_saw(srv: ServerProc) -> None:
    assert ask(srv, "triage-model").headers["x-understudy-route"] == "cloud"
    r = httpx.post(srv.url + "/admin/drill", json={"duration_s": 2.5}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    drill_id = body["drill"]["id"]
    assert body["refused_503"] == ["general"] and set(body["answered_locally"]) == {"triage", "notes"}
    assert breaker(srv) == "open"
    for _ in range(3):
        r = ask(srv, "triage-model")
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
        assert r.headers["x-understudy-fallback-reason"] == "drill"
    r = ask(srv, "notes")
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "local"
    r = ask(srv, "gpt-4o")  # uncovered: a 503, exactly as in a real outage
    assert r.status_code == 503 and r.headers["x-understudy-fallback-reason"] == "drill" and int(r.headers["retry-after"]) >= 1
    # a second drill while one runs
    r = httpx.post(srv.url + "/admin/drill", json={"duration_s": 1}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "drill_running"
    report = wait_finished(srv, drill_id)
    assert breaker(srv) == "closed" and report["ended_by"] == "timer"
    assert ask(srv, "triage-model").headers["x-understudy-route"] == "cloud"
    triage, notes = report["per_workload"]["triage"], report["per_workload"]["notes"]
    assert (triage["requests"], triage["local"], triage["failed"]) == (3, 3, 0)
    assert (notes["requests"], notes["local"], notes["failed"]) == (1, 1, 0)
    assert triage["verdict"] == "PASS" and notes["verdict"] == "PASS" and report["verdict"] == "PASS"
    assert report["other_traffic"] == {"requests": 1, "failed_503": 1}
    # the report's numbers are the journal's: read the SQLite file for the drill's window
    assert srv.config_path is not None
    conn = sqlite3.connect(srv.config_path.parent / "state" / "journal.sqlite3")
    rows = conn.execute("SELECT workload, route, status, latency_ms FROM events WHERE kind = 'route' AND ts >= ? AND ts <= ?",
                        (report["started_at"], report["ended_at"] + 0.1)).fetchall()
    triage_rows = [r for r in rows if r[0] == "triage"]
    assert len(triage_rows) == 3 and all(r[1] == "local" and r[2] == 200 for r in triage_rows)
    assert round(max(r[3] for r in triage_rows) / 1000, 3) == triage["p95_s"]  # p95 of 3 is the slowest
    drill_row = conn.execute("SELECT reason, prompt_tokens, completion_tokens FROM events WHERE kind = 'drill' AND request_id = ?",
                             (drill_id,)).fetchone()
    assert drill_row == ("PASS", 4, 4)
    md, js = report["files"]
    assert "PASS" in Path(md).read_text() and json.loads(Path(js).read_text())["id"] == drill_id


def test_abort_restores_at_once_and_bad_requests_are_refused(srv: ServerProc) -> None:
    for body, param in [({"duration_s": 31}, "duration_s"), ({"duration_s": 0}, "duration_s"), ({}, "duration_s"),
                        ({"duration_s": 5, "upstreams": ["nope"]}, "upstreams"),
                        ({"duration_s": 5, "workloads": ["general"]}, "workloads"),
                        ({"duration_s": 5, "color": "red"}, "color")]:
        r = httpx.post(srv.url + "/admin/drill", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.delete(srv.url + "/admin/drill", headers=AUTH).status_code == 400  # none running
    r = httpx.post(srv.url + "/admin/drill", json={"duration_s": 25}, headers=AUTH)
    assert r.status_code == 200 and breaker(srv) == "open"
    r = httpx.delete(srv.url + "/admin/drill", headers=AUTH)
    assert r.status_code == 200 and r.json()["report"]["ended_by"] == "abort"
    assert breaker(srv) == "closed"


def test_the_key_is_required_when_keys_are_configured(srv: ServerProc) -> None:
    for method in ("post", "get", "delete"):
        r = httpx.request(method.upper(), srv.url + "/admin/drill", json={"duration_s": 1} if method == "post" else None)
        assert r.status_code == 401


def test_workloads_mode_answers_only_those_locally(srv: ServerProc) -> None:
    r = httpx.post(srv.url + "/admin/drill", json={"duration_s": 20, "workloads": ["triage"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["refused_503"] == []
    try:
        assert breaker(srv) == "closed"
        r = ask(srv, "triage-model")
        assert r.headers["x-understudy-route"] == "local" and r.headers["x-understudy-fallback-reason"] == "drill"
        assert ask(srv, "notes").headers["x-understudy-route"] == "cloud"
        assert ask(srv, "gpt-4o").status_code == 200
    finally:
        report = httpx.delete(srv.url + "/admin/drill", headers=AUTH).json()["report"]
    assert list(report["per_workload"]) == ["triage"] and report["per_workload"]["triage"]["local"] == 1
    assert ask(srv, "triage-model").headers["x-understudy-route"] == "cloud"


def test_the_cli_runs_a_drill_with_synthetic_load_and_a_killed_cli_leaves_no_breaker_open(srv: ServerProc) -> None:
    cli = [sys.executable, "-m", "server", "drill", "--url", srv.url, "--key", KEY]
    done = subprocess.run([*cli, "--duration", "3", "--synthetic", "120", "--workloads", "triage"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "triage" in done.stdout
    proc = subprocess.Popen([*cli, "--duration", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while breaker(srv) != "open":
        assert time.monotonic() - t0 < 10
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    while breaker(srv) != "closed":  # the server's own timer restores it
        assert time.monotonic() - t0 < 10, "the breaker stayed open after the CLI died"
        time.sleep(0.1)
