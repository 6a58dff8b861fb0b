"""SIGTERM under load: /ready turns 503 at once, new requests are served through the grace
period and refused after it, every running stream finishes or ends with an error event (never a
silent cut), the journal is flushed, and the process exits 0 within the drain timeout."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from tests.conftest import CHAT_MODEL, run_server

GRACE, TIMEOUT = 4.0, 3.0


async def stream(url: str, max_tokens: int) -> str:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            return (await r.aread()).decode()


def test_sigterm_drains_without_cutting_an_answer_silently(tmp_path: Path) -> None:
    config = f"[server]\ndrain_grace_s = {GRACE}\ndrain_timeout_s = {TIMEOUT}\n"
    with run_server(tmp_path / "srv", config) as srv:
        async def scenario() -> tuple[list[str], dict[str, object]]:
            streams = [asyncio.create_task(stream(srv.url, 2000)) for _ in range(4)]
            await asyncio.sleep(1.0)  # four streams are decoding
            signalled = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            seen: dict[str, object] = {}
            async with httpx.AsyncClient(timeout=30) as client:
                await asyncio.sleep(0.2)
                ready = await client.get(srv.url + "/ready")
                seen["ready"] = ready.status_code
                short = await stream(srv.url, 4)  # inside the grace period: still served
                seen["during_grace"] = short
                await asyncio.sleep(max(0.0, GRACE + 0.3 - (time.monotonic() - signalled)))
                late = await client.post(srv.url + "/v1/chat/completions",
                                         json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
                seen["late"] = (late.status_code, late.json()["error"]["code"], late.headers.get("retry-after"))
            return list(await asyncio.gather(*streams)), seen

        bodies, seen = asyncio.run(scenario())
        started = time.monotonic()
        code = srv.process.wait(timeout=GRACE + TIMEOUT + 15)
        assert code == 0
        assert time.monotonic() - started < TIMEOUT + 5
        assert seen["ready"] == 503
        assert "[DONE]" in str(seen["during_grace"]) and "error" not in str(seen["during_grace"]), seen["during_grace"]
        assert seen["late"][:2] == (503, "server_shutting_down") and seen["late"][2]
        cut = [b for b in bodies if "server_shutting_down" in b]
        assert cut, "2000-token answers should still be running when the drain timeout ends"
        for body in bodies:
            assert body.rstrip().endswith("data: [DONE]"), body[-300:]  # every stream ends properly...
            finished = '"finish_reason":"length"' in body.replace(" ", "") or '"finish_reason":"stop"' in body.replace(" ", "")
            assert finished or "server_shutting_down" in body  # ...complete, or saying it is not
        conn = sqlite3.connect(tmp_path / "srv" / "state" / "journal.sqlite3")
        actions = [r[0] for r in conn.execute("SELECT reason FROM events WHERE kind = 'admin' ORDER BY id")]
        routes = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'route'").fetchone()[0]
        conn.close()
        assert actions[:2] == ["drain_start", "drain_end"] and routes >= 5  # flushed before exit
