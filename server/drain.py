"""Graceful shutdown: SIGTERM drains the box without cutting an answer silently.

Sequence (``Drain.run``, started by ``understudy serve``'s SIGTERM handler, ``server.cli``):
1. ``draining``: ``/ready`` answers 503 at once, so a load balancer stops sending, but new
   requests are still served for ``drain_grace_s`` (longer than the balancer's health-check
   interval: requests it sent before it noticed are not refused).
2. ``refusing``: new requests get 503 ``server_shutting_down`` + ``Retry-After``; requests already
   running get up to ``drain_timeout_s`` to finish.
3. Streams still running then are ended with an SSE error event and ``[DONE]``, and requests still
   queued with a 503 (``cut``): a client always sees that its answer is incomplete. The server then stops (the journal is flushed by the
   app's shutdown) and exits 0. A second SIGTERM skips to step 3.

``Edge`` counts and registers every request's task and refuses new ones in step 2. Step 3 cancels
the tasks still running: ``server.sse.SseResponse`` turns that into an error event at the end of
its stream, and ``Edge`` into a 503 for a request that had not started its answer (still queued).
Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable

SHUTTING_DOWN = "The server is shutting down; the answer above is incomplete. Retry the request (another box may take it)."
_CUT: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()


def cut_here() -> bool:
    """Whether the drain is ending the current task's request (so that its journal line says
    503, not a client that went away). Any code on the request's task may ask."""
    return asyncio.current_task() in _CUT


class Drain:
    def __init__(self, grace_s: float, timeout_s: float) -> None:
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.state = "serving"
        self._requests: set[asyncio.Task[object]] = set()
        self._cut: set[asyncio.Task[object]] = set()
        self.cut_count = 0

    @property
    def inflight(self) -> int:
        """Requests being served now (``Edge`` registers each one's task)."""
        return len(self._requests)

    @property
    def refusing(self) -> bool:
        return self.state in ("refusing", "stopping")

    def register(self, task: asyncio.Task[object]) -> None:
        self._requests.add(task)

    def unregister(self, task: asyncio.Task[object]) -> None:
        self._requests.discard(task)
        self._cut.discard(task)

    def was_cut(self, task: asyncio.Task[object] | None) -> bool:
        return task in self._cut

    def cut_all(self) -> int:
        """End every request still running: streams with an error event, the others with a 503."""
        tasks = [t for t in self._requests if t not in self._cut and not t.done()]
        for task in tasks:
            self._cut.add(task)
            _CUT.add(task)
            task.cancel()
        self.cut_count += len(tasks)
        return len(tasks)

    async def run(self, stop: Callable[[], None], on_step: Callable[[str, str], None] | None = None) -> None:
        """Steps 1-3, then ``stop()`` (uvicorn's ``should_exit``)."""
        note = on_step or (lambda step, detail: None)
        self.state = "draining"
        note("drain_start", f"grace {self.grace_s:g} s, timeout {self.timeout_s:g} s, {self.inflight} in flight")
        await asyncio.sleep(self.grace_s)
        if self.state != "draining":
            return  # a second signal already ended it (``finish`` and the stop ran)
        self.state = "refusing"
        deadline = time.monotonic() + self.timeout_s
        while self.inflight > 0 and time.monotonic() < deadline and self.state == "refusing":
            await asyncio.sleep(0.05)
        await self.finish(note)
        stop()

    async def finish(self, note: Callable[[str, str], None] | None = None) -> None:
        self.state = "stopping"
        cut = self.cut_all()
        if cut:
            await asyncio.sleep(0.2)  # let the cut streams write their error event
        if note is not None:
            note("drain_end", f"{cut} requests ended (streams with an error event, queued ones with a 503), {self.inflight} still in flight")
