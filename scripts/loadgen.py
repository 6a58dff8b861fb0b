"""A small HTTP/1.1 load generator for the benchmarks (stdlib asyncio, keep-alive, SSE).

Why not httpx or the openai client here: the load generator shares this machine's two cores with
the server it measures. A few dozen lines of raw asyncio cost far less per request and per
token, and the same client drives every server compared, so the ratios stay fair.

``Connection.request()`` sends one request and returns a ``Reply`` with the status, headers,
and, for an SSE answer, the arrival time and the text of every content event.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    started: float = 0.0
    ended: float = 0.0
    token_times: list[float] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error_event: bool = False
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        """From the server's usage when it sent one, else one per content event."""
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None

    @property
    def itl(self) -> float | None:
        """Mean time per output token after the first (robust to servers that send several per event)."""
        n = self.completion_tokens
        if n < 2 or len(self.token_times) < 1:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (n - 1)


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._got_status = False

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None

    async def request(self, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None) -> Reply:
        reused = self._writer is not None and not self._writer.is_closing()
        reply = await self._request_once(method, path, payload, headers)
        if reply.status == 0 and reused:
            # The server closed the kept-alive connection after its last answer (llama-server
            # does after every stream): nothing was received, so send again on a new one.
            reply = await self._request_once(method, path, payload, headers)
        return reply

    async def _request_once(self, method: str, path: str, payload: Any, headers: dict[str, str] | None) -> Reply:
        if self._writer is None or self._writer.is_closing():
            await self._open()
        assert self._reader is not None and self._writer is not None
        body = json.dumps(payload).encode() if payload is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        if payload is not None:
            head += "Content-Type: application/json\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        started = time.perf_counter()
        self._writer.write(head.encode() + b"\r\n" + body)
        self._got_status = False
        try:
            return await self._read_reply(started)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            # status 0: nothing came back (safe to resend); -1: the answer broke off midway
            return Reply(-1 if self._got_status else 0, {}, started=started, ended=time.perf_counter())

    async def _read_reply(self, started: float) -> Reply:
        reader = self._reader
        assert reader is not None
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        self._got_status = True
        headers: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        reply = Reply(status, headers, started=started)
        sse = headers.get("content-type", "").startswith("text/event-stream")
        buf = b""
        async for piece in _body(reader, headers):
            if not sse:
                reply.body += piece
                continue
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                _on_event(reply, event)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        reply.ended = time.perf_counter()
        return reply


def _on_event(reply: Reply, event: bytes) -> None:
    now = time.perf_counter()
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        if b'"content":' in data or b'"text":' in data or b'"usage":{' in data or b'"error"' in data or b'finish_reason":"' in data:
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if "error" in obj:
                reply.error_event = True
                continue
            if obj.get("usage"):
                reply.usage = obj["usage"]
            for choice in obj.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    reply.token_times.append(now)
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data
