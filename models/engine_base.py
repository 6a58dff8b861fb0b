"""The thread skeleton shared by every engine (LLM and embedding): one thread owns one model.

Contract:
- Event-loop thread: ``start(loop)`` once; ``_enqueue(entry, cost, priority)`` from a subclass's
  ``submit()`` (raises ``EngineOverloaded`` at once when ``cost`` more would pass ``max_waiting``,
  counting only what waits in the request's priority class and above: a backlog of background
  or bulk work never shuts out a higher class);
  ``abort(request_id)`` from ``Channel.cancel()``; ``stop()`` at shutdown.
- Engine thread: ``_run`` sleeps until there is work, hands new entries and aborts to the
  subclass (``_accept``, ``_cancel``), runs one ``_step`` and posts the step's results to the
  loop in one ``Outbox.post``. ``_step`` returns how long the thread may sleep when idle-but-not-
  empty (the embedding batcher's wait window), or None.
- Subclasses report ``_has_work()`` and ``_waiting()`` (the queued cost per priority class, for
  admission).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from models.bridge import Channel, Final, Outbox
from models.priority import Priority

log = logging.getLogger("understudy.engine")

Batch = list[tuple[Channel, Any]]


class EngineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class EngineOverloaded(Exception):
    """The waiting queue is full; ``retry_after`` is a guess in seconds."""

    def __init__(self, waiting: int, retry_after: float) -> None:
        super().__init__(f"{waiting} requests are already waiting for this model")
        self.retry_after = retry_after


class EngineStopped(Exception):
    pass


class QueueTimedOut(Exception):
    pass


class EngineFailure(Exception):
    pass


class InputTooLong(Exception):
    """An input is longer than the model accepts (raised to the handler through ``Final.error``)."""


class EngineThread:
    def __init__(self, name: str, max_waiting: int, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._max_waiting = max_waiting
        self._slots = max(1, slots)
        self._clock = clock
        self._cv = threading.Condition()
        self._inbox: list[Any] = []
        self._aborts: list[int] = []
        self._waiting_by_class = [0] * len(Priority)
        self._state = EngineState.CREATED
        self._thread: threading.Thread | None = None
        self._outbox: Outbox | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._avg_seconds = 1.0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.busy_s = 0.0
        """Engine-thread seconds spent working (from a wake-up to the step's post), not waiting."""

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def max_waiting(self) -> int:
        """The admission limit (requests for an LLM, inputs for an embedding model)."""
        return self._max_waiting

    # -- event-loop thread -----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._outbox = Outbox(loop)
        self._state = EngineState.RUNNING
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def wait_started(self, timeout: float = 120.0) -> None:
        """Block (loader thread) until the engine thread has run ``_thread_start``; raises what it
        raised (the model then never becomes ready)."""
        if not self._started.wait(timeout):
            raise TimeoutError(f"engine {self.name} did not start within {timeout:g} s")
        if self._start_error is not None:
            raise self._start_error

    def _channel(self, request_id: int) -> Channel:
        assert self._loop is not None, "engine not started"
        return Channel(self._loop, lambda: self.abort(request_id), request_id)

    @property
    def _num_waiting(self) -> int:
        return sum(self._waiting_by_class)

    def _enqueue(self, entry: Any, cost: int = 1, priority: int = Priority.NORMAL) -> None:
        with self._cv:
            if self._state is not EngineState.RUNNING:
                raise EngineStopped(self.name)
            ahead = sum(self._waiting_by_class[: priority + 1])
            if ahead and ahead + cost > self._max_waiting:
                raise EngineOverloaded(ahead, self._retry_after())
            self._inbox.append(entry)
            self._waiting_by_class[priority] += cost
            self._cv.notify()

    def abort(self, request_id: int) -> None:
        """Any thread; the request is dropped at the start of the next step."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            if self._state is not EngineState.RUNNING:
                self._state = EngineState.STOPPED
                return
            self._state = EngineState.STOPPED
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():  # still inside a model call: freeing the model now would crash
                log.error("engine %s did not stop within 30 s; leaving its model allocated", self.name)
                return
        self._close()

    def _retry_after(self) -> float:
        return max(1.0, self._avg_seconds * (1 + self._num_waiting / self._slots))

    def _record_duration(self, seconds: float) -> None:
        self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * seconds

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._thread_start()
        except Exception as exc:
            self._start_error = exc
            self._state = EngineState.STOPPED
        finally:
            self._started.set()
        sleep: float | None = None
        while True:
            with self._cv:
                if not (self._inbox or self._aborts) and self._state is EngineState.RUNNING:
                    if not self._has_work():
                        self._cv.wait_for(lambda: self._inbox or self._aborts or self._state is not EngineState.RUNNING)
                    elif sleep is not None:
                        self._cv.wait(timeout=sleep)
                if self._state is not EngineState.RUNNING:
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            started = time.perf_counter()
            batch: Batch = []
            try:
                if inbox:
                    self._accept(inbox, batch)
                if aborts:
                    self._cancel(aborts)
                sleep = self._step(batch)
            except Exception as exc:  # a model failure must not kill the thread
                log.exception("engine %s: step failed", self.name)
                self._recover(batch, exc)
                sleep = None
            with self._cv:
                by_class = self._waiting()
                for e in self._inbox:
                    by_class[self._priority(e)] += self._cost(e)
                self._waiting_by_class = by_class
            if self._outbox is not None:
                self._outbox.post(batch)
            self.busy_s += time.perf_counter() - started
        batch = [(ch, Final(None, error=EngineStopped("the server is shutting down"))) for ch in self._open_channels()]
        batch += [(self._entry_channel(e), Final(None, error=EngineStopped("the server is shutting down"))) for e in self._inbox]
        if self._outbox is not None:
            self._outbox.post(batch)

    def _recover(self, batch: Batch, exc: Exception) -> None:
        """After a failed step: ``_fail`` ends what the failure touched. If that fails too, every
        open request gets an error and the subclass starts from a clean state (``_reset``): no
        client is ever left waiting, and the thread keeps serving new requests."""
        try:
            self._fail(batch, exc)
            return
        except Exception:
            log.exception("engine %s: could not contain a failed step; failing every open request", self.name)
        answered = {id(channel) for channel, item in batch if isinstance(item, Final)}
        error = EngineFailure(f"engine error: {type(exc).__name__}")
        for channel in self._open_channels():
            if id(channel) not in answered:
                batch.append((channel, Final(None, error=error)))
        try:
            self._reset()
        except Exception:
            log.exception("engine %s: reset failed", self.name)

    # -- subclass hooks --------------------------------------------------------------------------
    def _thread_start(self) -> None:
        """First thing the engine thread does (before serving anything)."""

    def _accept(self, entries: list[Any], batch: Batch) -> None:
        raise NotImplementedError

    def _cancel(self, request_ids: list[int]) -> None:
        raise NotImplementedError

    def _step(self, batch: Batch) -> float | None:
        raise NotImplementedError

    def _fail(self, batch: Batch, exc: Exception) -> None:
        raise NotImplementedError

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _waiting(self) -> list[int]:
        """Queued cost per priority class (a new list)."""
        raise NotImplementedError

    def _cost(self, entry: Any) -> int:
        return 1

    def _priority(self, entry: Any) -> int:
        raise NotImplementedError

    def _entry_channel(self, entry: Any) -> Channel:
        raise NotImplementedError

    def _open_channels(self) -> list[Channel]:
        """Every request accepted and not yet answered (forgotten by the subclass)."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop all per-request state after ``_open_channels`` (last-resort recovery)."""
        raise NotImplementedError

    def _close(self) -> None:
        pass
