"""The one crossing between an engine thread and the asyncio event loop.

Each request gets a ``Channel``. The engine thread never touches it directly: it collects
``(channel, item)`` pairs during a step and hands the whole list to ``Outbox.post`` once per step,
which schedules a single ``loop.call_soon_threadsafe`` callback that delivers them all on the
loop thread. Handlers ``await channel.get()``, which returns every item that arrived since the last
call (so a slow reader gets several tokens at once instead of one wake-up per token).

``Channel.cancel()`` (loop thread, e.g. when the client disconnects) calls the engine's abort hook,
which is thread-safe; the engine frees the request's slot at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Delta:
    text: str


@dataclass(slots=True)
class Final:
    """Last item of a request. ``finish_reason`` is OpenAI's (``stop``/``length``) or None on error."""

    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: Exception | None = None
    payload: Any = None


class Channel:
    __slots__ = ("_loop", "_items", "_waiter", "_on_cancel", "closed", "request_id")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None], request_id: int = 0) -> None:
        self._loop = loop
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._on_cancel = on_cancel
        self.closed = False
        self.request_id = request_id

    def deliver(self, item: Any) -> None:
        """Loop thread only (called by ``Outbox``)."""
        self._items.append(item)
        if isinstance(item, Final):
            self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list[Any]:
        """Every item delivered since the last call; waits for at least one."""
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def cancel(self) -> None:
        """The client is gone: ask the engine to drop the request (idempotent, loop thread)."""
        if not self.closed:
            self.closed = True
            self._on_cancel()


class Outbox:
    """Engine-thread side: one cross-thread callback per engine step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, batch: list[tuple[Channel, Any]]) -> None:
        if batch:
            try:
                self._loop.call_soon_threadsafe(_deliver_all, batch)
            except RuntimeError:
                pass  # the loop is closed: the server is shutting down


def _deliver_all(batch: list[tuple[Channel, Any]]) -> None:
    for channel, item in batch:
        channel.deliver(item)
