"""One cloud upstream: a pooled ``httpx.AsyncClient`` with split timeouts, and its circuit breaker.

Exception tree (what the router does with each)::

    UpstreamError                        .reason is the X-Understudy-Fallback-Reason
    ├── UpstreamUnreachable              fail over
    │   ├── UpstreamConnectError         connect_error: refused, reset, closed before answering
    │   └── UpstreamTimeout              timeout: connect, first byte or between chunks
    ├── UpstreamServerError              upstream_5xx: a 5xx, or a response that is not OpenAI's format
    ├── UpstreamRateLimited              rate_limited: a 429 (carries Retry-After)
    └── UpstreamRejected                 a 4xx: the cloud refused *this request*; relayed to the
                                         client as-is, never a failover, never trips the breaker

Timeouts: ``connect_timeout_s`` for the TCP (and TLS) connect; ``first_byte_timeout_s`` from
sending the request until the response headers and, when streaming, the first complete SSE event
(for a non-streaming request this covers the whole generation, since OpenAI sends the body at
the end); ``read_timeout_s`` for the body of a non-streaming answer and between two events of a
stream.

Headers are built from scratch: the upstream gets its own key, never the client's; only a few
harmless response headers come back, and the upstream key is scrubbed from any relayed body.
All methods run on the event loop. The transport is injectable (``httpx.MockTransport`` in unit
tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from server.breaker import CircuitBreaker, Listener
from server.config import UpstreamConfig


class UpstreamError(Exception):
    reason = "upstream_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UpstreamUnreachable(UpstreamError):
    pass


class UpstreamConnectError(UpstreamUnreachable):
    reason = "connect_error"


class UpstreamTimeout(UpstreamUnreachable):
    reason = "timeout"


class UpstreamServerError(UpstreamError):
    reason = "upstream_5xx"


class UpstreamRateLimited(UpstreamError):
    reason = "rate_limited"

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRejected(UpstreamError):
    reason = "rejected"

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


_PASS_HEADERS = ("x-request-id", "openai-processing-ms", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens")
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _retry_after(headers: httpx.Headers) -> float | None:
    raw = headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass
class UpstreamReply:
    status: int
    body: bytes
    headers: dict[str, str]
    usage: dict[str, Any] | None = None


class UpstreamStream:
    """An open SSE stream from an upstream. ``open_stream`` reads its first event (``first``);
    ``events()`` yields the rest, each validated and ending with a blank line."""

    def __init__(self, response: httpx.Response, read_timeout: float, scrub: Callable[[bytes], bytes],
                 headers: dict[str, str]) -> None:
        self.first = b""
        self.headers = headers
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._response = response
        self._chunks = response.aiter_bytes()
        self._buffer = b""
        self._read_timeout = read_timeout
        self._scrub = scrub

    async def events(self) -> AsyncIterator[bytes]:
        """Raises ``UpstreamError`` if the stream breaks (cut, stalled, malformed)."""
        while not self.done:
            event = await self.next_event(self._read_timeout)
            if event is None:
                return
            yield event

    async def aclose(self) -> None:
        await self._response.aclose()

    async def next_event(self, timeout: float) -> bytes | None:
        """The next complete event, None at a clean end (after ``[DONE]``)."""
        while True:
            match = _EVENT_END.search(self._buffer)
            if match is not None:
                raw = self._buffer[: match.start()]
                self._buffer = self._buffer[match.end():]
                if not raw.strip():
                    continue
                self._check(raw)
                return self._scrub(raw) + b"\n\n"
            try:
                async with asyncio.timeout(timeout):
                    chunk = await anext(self._chunks)
            except StopAsyncIteration:
                if self._buffer.strip():
                    raise UpstreamConnectError("the upstream closed the stream in the middle of an event") from None
                if not self.done:
                    raise UpstreamConnectError("the upstream closed the stream before [DONE]") from None
                return None
            except TimeoutError:
                raise UpstreamTimeout(f"no data from the upstream for {timeout:g} s") from None
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise UpstreamConnectError(f"the upstream stream broke: {type(exc).__name__}") from None
            self._buffer += chunk

    def _check(self, raw: bytes) -> None:
        for line in raw.splitlines():
            if not line or line.startswith(b":"):
                continue
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.done = True
                    continue
                try:
                    payload = json.loads(data)
                except ValueError:
                    raise UpstreamServerError("the upstream sent an SSE event that is not JSON") from None
                if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                    self.usage = payload["usage"]
                continue
            if not line.startswith((b"event:", b"id:", b"retry:")):
                raise UpstreamServerError("the upstream sent a line that is not SSE")


class Upstream:
    def __init__(
        self,
        config: UpstreamConfig,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        breaker = replace(config.breaker, trial_interval_s=config.probe_interval_open_s)
        self.breaker = CircuitBreaker(config.name, breaker, clock, listener=listener)
        timeout = httpx.Timeout(connect=config.connect_timeout_s, read=None, write=config.read_timeout_s, pool=config.connect_timeout_s)
        base = config.base_url.rstrip("/") + "/"
        self._headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._transport = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30))
        self._client = httpx.AsyncClient(base_url=base, timeout=timeout, transport=self._transport, headers=self._headers)
        self._base = httpx.URL(base)
        self._post_headers = httpx.Headers({**self._headers, "User-Agent": "understudy"})
        self._timeouts = timeout.as_dict()
        # Probes open a fresh connection each time: a TCP connect is part of what they check.
        self._probe_client = httpx.AsyncClient(
            base_url=base, transport=transport, headers=self._headers,
            timeout=httpx.Timeout(config.probe_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._key = config.api_key.encode() if config.api_key else b""

    def scrub(self, data: bytes) -> bytes:
        """Remove the upstream key from anything relayed to a client."""
        return data.replace(self._key, b"[redacted]") if self._key and self._key in data else data

    def _pass_headers(self, headers: httpx.Headers) -> dict[str, str]:
        return {f"x-upstream-{k.removeprefix('x-')}": headers[k] for k in _PASS_HEADERS if k in headers}

    async def _send(self, path: str, content: bytes) -> httpx.Response:
        # Straight to the client's pooled transport: the client's auth, redirect and cookie
        # layers do nothing for this call and cost about a tenth of a millisecond per request.
        request = httpx.Request("POST", self._base.join(path.lstrip("/")), headers=self._post_headers, content=content,
                                extensions={"timeout": self._timeouts})
        try:
            async with asyncio.timeout(self.config.first_byte_timeout_s):
                response = await self._transport.handle_async_request(request)
                response.request = request
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.name} within {self.config.first_byte_timeout_s:g} s") from None
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{self.name}: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            try:
                async with asyncio.timeout(self.config.read_timeout_s):
                    body = await response.aread()
            except (TimeoutError, httpx.HTTPError):
                body = b""
            finally:
                await response.aclose()
            self._raise_for(response, body)
        return response

    def _raise_for(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status == 429:
            raise UpstreamRateLimited(f"{self.name} answered 429", _retry_after(response.headers))
        if status >= 500:
            raise UpstreamServerError(f"{self.name} answered {status}")
        raise UpstreamRejected(status, self.scrub(body), response.headers.get("content-type", "application/json"))

    async def post(self, path: str, content: bytes) -> UpstreamReply:
        """A non-streaming call with a JSON body; raises ``UpstreamError``."""
        response = await self._send(path, content)
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                body = await response.aread()
        except TimeoutError:
            raise UpstreamTimeout(f"{self.name}: the body did not arrive within {self.config.read_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} while reading the body") from None
        finally:
            await response.aclose()
        try:
            parsed = json.loads(body)
        except ValueError:
            raise UpstreamServerError(f"{self.name} answered with a body that is not JSON") from None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        usage = usage if isinstance(usage, dict) else None
        return UpstreamReply(response.status_code, self.scrub(body), self._pass_headers(response.headers), usage)

    async def open_stream(self, path: str, content: bytes) -> UpstreamStream:
        """Send a streaming call and wait for its first complete event (within the first-byte timeout)."""
        started = time.monotonic()
        response = await self._send(path, content)
        stream = UpstreamStream(response, self.config.read_timeout_s, self.scrub, self._pass_headers(response.headers))
        try:
            left = max(0.001, self.config.first_byte_timeout_s - (time.monotonic() - started))
            first = await stream.next_event(left)
        except BaseException:
            await response.aclose()
            raise
        if first is None:
            await response.aclose()
            raise UpstreamConnectError(f"{self.name} closed the stream without any event")
        stream.first = first
        return stream

    async def get_json(self, path: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                response = await self._client.get(path.lstrip("/"))
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamTimeout(f"{self.name}: no answer to GET {path}") from None
        except httpx.TransportError as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            self._raise_for(response, response.content)
        try:
            return response.json()
        except ValueError:
            raise UpstreamServerError(f"{self.name}: GET {path} is not JSON") from None

    async def probe(self) -> tuple[str | None, float | None]:
        """Cheap health check: a new TCP connection and ``GET /models``.
        Returns (None, None) when healthy, else (reason, Retry-After if the upstream sent one)."""
        try:
            response = await self._probe_client.get("models")
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.TransportError:
            return "connect_error", None
        if response.status_code == 429:
            return "rate_limited", _retry_after(response.headers)
        if response.status_code >= 500:
            return "upstream_5xx", None
        return None, None  # 2xx, or a 4xx (the upstream is up; maybe /models is not offered)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._probe_client.aclose()


@dataclass
class UpstreamSet:
    """All configured upstreams by name, and the default one (for requests that match no workload)."""

    by_name: dict[str, Upstream] = field(default_factory=dict)
    default: Upstream | None = None

    def get(self, name: str | None) -> Upstream | None:
        if name is None:
            return self.default
        return self.by_name.get(name)

    async def aclose(self) -> None:
        for upstream in self.by_name.values():
            await upstream.aclose()
