#!/usr/bin/env python3
"""A fake OpenAI-compatible cloud on loopback that fails on command.

A real HTTP/1.1 server (asyncio, keep-alive, TCP_NODELAY) speaking OpenAI's wire format:
``GET /v1/models``, ``POST /v1/chat/completions`` (streaming and not), ``POST /v1/completions``,
``POST /v1/embeddings``. Used by the tests (``tests/test_failover*.py``) and by
``scripts/outage_drill.py``; stdlib only, so it can also run alone:

    python scripts/fake_cloud.py --port 9999

Faults (``FakeCloud.set_fault(mode, ...)`` in-process, or ``POST /_control`` with the same
fields as JSON):

| mode          | what the client sees                                                   |
|---------------|------------------------------------------------------------------------|
| ``ok``        | normal answers                                                         |
| ``refuse``    | connection refused (the listening socket is closed)                    |
| ``blackhole`` | the connection is accepted, the request is never read or answered      |
| ``hang``      | the request is read, no header is ever sent                            |
| ``status``    | ``status`` (500/502/503/429...) for the next ``count`` requests, with ``retry_after`` if given; then ``ok`` |
| ``cut``       | streams send ``after`` chunks, then the connection is closed          |
| ``stall``     | streams send ``after`` chunks, then nothing more (connection kept)     |
| ``malformed`` | streams send ``after`` chunks, then a line that is not valid SSE/JSON  |
| ``slow``      | completions: headers (and a stream's role-only chunk) at once, the first content after ``delay`` s, the rest at the normal pace; a non-streamed answer after ``delay`` s |
| ``trickle``   | completions: headers and the role-only chunk at once, then one content token every ``delay`` s |

``slow`` and ``trickle`` leave ``GET /v1/models`` (the probes) fast, as in a brownout.

The model ``invalid-for-cloud`` gets a 400; ``echo-auth`` gets a 400 whose message quotes the
Authorization header it received (as real providers quote a wrong key); ``odd-usage`` gets an
answer whose ``usage`` is a string.

``FakeCloud.script`` (a function of the request body) scripts the answers' text.

Every request received is recorded (method, path, headers, JSON body) in ``FakeCloud.requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WORDS = ("The", " cloud", " model", " says", " hello", " and", " answers", " your", " question", " in", " full", ".")


@dataclass
class Fault:
    mode: str = "ok"
    status: int = 500
    count: int = 0
    retry_after: float | None = None
    after: int = 2
    only_path: str | None = None
    delay: float = 0.0


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class FakeCloud:
    host: str = "127.0.0.1"
    port: int = 0
    chunk_interval_s: float = 0.0
    answer_words: int = 11
    models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    fault: Fault = field(default_factory=Fault)
    requests: list[Recorded] = field(default_factory=list)
    script: Callable[[dict[str, Any]], str] | None = None
    """Scripted answers: the completion text for a request body (default: the fixed sentence)."""

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    # -- control (any thread) ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeCloud":
        self._thread = threading.Thread(target=self._run, name="fake-cloud", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def set_fault(self, mode: str, status: int = 500, count: int = 1_000_000, retry_after: float | None = None,
                  after: int = 2, only_path: str | None = None, drop_connections: bool = True, delay: float = 0.0) -> None:
        """Switch behaviour. ``refuse`` closes the listening socket; leaving it re-opens the same port.
        ``only_path`` limits an HTTP-level fault to one path (e.g. not the probes' ``/v1/models``).
        ``drop_connections`` also closes open keep-alive connections (a process that died would)."""
        assert self._loop is not None
        fault = Fault(mode, status, count, retry_after, after, only_path, delay)
        fut = asyncio.run_coroutine_threadsafe(self._apply(fault, drop_connections), self._loop)
        fut.result(10)

    def received(self, path: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if path is None or r.path == path]

    # -- server --------------------------------------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        sock.listen(256)
        self._server = await asyncio.start_server(self._handle, sock=sock)

    async def _shutdown(self) -> None:
        await self._close_all(listen_too=True)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_all(self, listen_too: bool) -> None:
        if listen_too and self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _apply(self, fault: Fault, drop: bool) -> None:
        was_refusing = self.fault.mode == "refuse"
        self.fault = fault
        if fault.mode == "refuse":
            await self._close_all(listen_too=True)
        else:
            if drop:
                await self._close_all(listen_too=False)
            if was_refusing or self._server is None:
                await self._listen()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        try:
            if self.fault.mode == "blackhole":
                await asyncio.sleep(3600)
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, headers, raw = request
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                self.requests.append(Recorded(method, path, headers, body, time.monotonic()))
                if path == "/_control" and method == "POST":
                    await self._apply(Fault(**body), drop=False)
                    await _send_json(writer, 200, {"ok": True})
                    continue
                if not await self._answer(writer, method, path, body):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, method: str, path: str, body: Any) -> bool:
        """Write one response; returns False when the connection must end."""
        fault = self.fault
        if fault.only_path is not None and fault.only_path != path:
            fault = Fault()
        if fault.mode == "hang" or fault.mode == "blackhole":
            await asyncio.sleep(3600)
            return False
        if fault.mode == "status" and fault.count > 0:
            fault.count -= 1
            if fault.count == 0 and fault is self.fault:
                self.fault = Fault()
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            err = {"error": {"message": f"fake cloud status {fault.status}", "type": "server_error" if fault.status >= 500 else "rate_limit_error", "param": None, "code": None}}
            await _send_json(writer, fault.status, err, extra)
            return True
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-cloud"} for m in self.models]
            await _send_json(writer, 200, {"object": "list", "data": data})
            return True
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            if isinstance(body, dict) and body.get("model") == "odd-usage":
                # a provider whose "usage" is not the object OpenAI documents
                await _send_json(writer, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "odd-usage", "usage": "n/a",
                                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
                return True
            if isinstance(body, dict) and body.get("model") == "echo-auth":
                # like a real provider quoting the key it was given in an error message
                seen = self.requests[-1].headers.get("authorization", "")
                await _send_json(writer, 400, {"error": {"message": f"Model echo-auth refused for key {seen}", "type": "invalid_request_error", "param": "model", "code": None}})
                return True
            return await self._complete(writer, path == "/v1/chat/completions", body or {}, fault)
        if method == "POST" and path == "/v1/embeddings":
            inputs = body.get("input") if isinstance(body, dict) else None
            items = [inputs] if isinstance(inputs, str) else list(inputs or [])
            data = [{"object": "embedding", "index": i, "embedding": [((i + k) % 7) / 7.0 for k in range(8)]} for i in range(len(items))]
            await _send_json(writer, 200, {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": 3 * len(items), "total_tokens": 3 * len(items)}})
            return True
        await _send_json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error", "param": None, "code": None}})
        return True

    async def _complete(self, writer: asyncio.StreamWriter, chat: bool, body: dict[str, Any], fault: Fault) -> bool:
        model = body.get("model", "gpt-4o-mini")
        if model == "invalid-for-cloud":
            await _send_json(writer, 400, {"error": {"message": "model invalid-for-cloud is not valid", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
            return True
        n = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or self.answer_words), self.answer_words)
        words = WORDS[:n] if self.script is None else tuple(re.findall(r"\S+\s*", self.script(body)))
        rid = f"chatcmpl-cloud{int(time.time() * 1000)}"
        usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
        if not body.get("stream"):
            if fault.mode in ("slow", "trickle"):
                await asyncio.sleep(fault.delay * (1 if fault.mode == "slow" else max(1, len(words))))
            text = "".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                obj = "text_completion"
            await _send_json(writer, 200, {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], "usage": usage})
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        obj = "chat.completion.chunk" if chat else "text_completion"
        events: list[dict[str, Any]] = []
        if chat:
            events.append({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        for w in words:
            events.append({"index": 0, "delta": {"content": w}, "finish_reason": None} if chat else {"index": 0, "text": w, "finish_reason": None})
        events.append({"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"})
        for i, choice in enumerate(events):
            content = i > 0 or not chat  # a chat stream's first event is the role-only chunk
            if fault.mode == "trickle" and content or fault.mode == "slow" and i == (1 if chat else 0):
                await asyncio.sleep(fault.delay)
            if fault.mode in ("cut", "stall", "malformed") and i == fault.after:
                if fault.mode == "cut":
                    writer.transport.abort()
                    return False
                if fault.mode == "stall":
                    await asyncio.sleep(3600)
                    return False
                _chunk(writer, b"data: {this is not json\n\n")
                await writer.drain()
                continue
            _chunk(writer, b"data: " + json.dumps({"id": rid, "object": obj, "created": 0, "model": model, "choices": [choice]}).encode() + b"\n\n")
            await writer.drain()
            if self.chunk_interval_s:
                await asyncio.sleep(self.chunk_interval_s)
        if (body.get("stream_options") or {}).get("include_usage"):
            _chunk(writer, b"data: " + json.dumps({"id": rid, "object": obj, "created": 0, "model": model, "choices": [], "usage": usage}).encode() + b"\n\n")
        _chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
              502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Status")
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    raw = await reader.readexactly(length) if length else b""
    return method, path.split("?", 1)[0], headers, raw


def main() -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible cloud (POST /_control to inject faults)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--chunk-interval", type=float, default=0.0)
    args = parser.parse_args()
    cloud = FakeCloud(args.host, args.port, chunk_interval_s=args.chunk_interval).start()
    print(f"fake cloud on {cloud.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cloud.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
