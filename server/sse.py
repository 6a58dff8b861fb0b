"""Writing a streamed answer straight to ASGI, and noticing a client that hangs up.

Used on the event-loop thread by ``server.local`` (local streams and non-streamed local answers)
and ``server.routing`` (relayed cloud streams).

- ``DisconnectWatch``: one task per request reads ``receive`` until ``http.disconnect``, then
  cancels the task serving the request; leaving the ``with`` block turns that cancellation into
  ``ClientGone``. Nothing is created per token or per wake-up.
- ``SseResponse``: a Starlette ``Response`` whose body is an async iterator of ready-made SSE
  bytes, each sent with one ``send`` call. It replaces ``StreamingResponse``, which (under an
  ASGI 2.3 server such as uvicorn) runs an anyio task group per request. When the client goes,
  the body iterator is cancelled at its current ``await`` and closed, so its ``finally`` (which
  aborts the engine request and records the answer) always runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from starlette.responses import Response

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The HTTP client disconnected while its request was queued or running."""


class DisconnectWatch:
    """``with DisconnectWatch(receive): ...`` in the task that serves the request (the request
    body must already have been read). Raises ``ClientGone`` out of the block if the client
    disconnected while the block was awaiting."""

    __slots__ = ("gone", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch needs a running task"
        self._task = task
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()

    def __enter__(self) -> DisconnectWatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._watcher.cancel()
        if self.gone and kind is asyncio.CancelledError:
            self._task.uncancel()
            raise ClientGone() from None


class SseResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None, status_code: int = 200) -> None:
        self.body_iterator = body
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:  # type: ignore[override]
        body = self.body_iterator
        drain = scope.get("understudy.drain")  # server.drain: a shutdown may end this stream with an error event
        task = asyncio.current_task()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            with DisconnectWatch(receive):
                tail = b""
                try:
                    async for chunk in body:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except asyncio.CancelledError:
                    if drain is None or not drain.was_cut(task):
                        raise
                    assert task is not None
                    task.uncancel()
                    tail = shutdown_event()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            await body.aclose()  # type: ignore[attr-defined]


def shutdown_event() -> bytes:
    from server import openai_format as fmt
    from server.drain import SHUTTING_DOWN

    return fmt.sse_error(SHUTTING_DOWN, "server_shutting_down") + fmt.DONE
