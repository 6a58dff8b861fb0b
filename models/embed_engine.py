"""One embedding model's engine: the engine thread (``EngineThread``) plus dynamic batching.

``submit(texts)`` (event-loop thread) queues a job of one or more inputs; the engine thread
tokenizes it, refuses it whole if an input is longer than the model's limit, and otherwise hands
its inputs to the ``DynamicBatcher``. Each step runs one batch through the model and completes
the jobs whose last input was in it. The embedder is injected (``OnnxEmbedder`` in production).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models.bridge import Channel, Final
from models.embed_batcher import DynamicBatcher, EmbedJob
from models.engine_base import Batch, EngineFailure, EngineThread, InputTooLong, QueueTimedOut
from models.priority import Priority

_ids = itertools.count(1)


class Embedder(Protocol):
    max_length: int
    dimensions: int

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...
    def count_tokens(self, texts: list[str]) -> list[int]: ...
    def embed(self, batch: list[list[int]]) -> np.ndarray: ...


@dataclass
class _Pending:
    job_id: int
    texts: list[str]
    channel: Channel
    arrival: float
    priority: int


class EmbedEngine(EngineThread):
    def __init__(
        self,
        name: str,
        embedder: Embedder,
        max_batch_requests: int,
        max_batch_tokens: int,
        max_waiting: int,
        max_wait_s: float = 0.0,
        queue_timeout_s: float = 60.0,
        fill_wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, max_waiting, max_batch_requests, clock)
        self._queue_timeout_s = queue_timeout_s
        self._embedder = embedder
        self._batcher = DynamicBatcher(max_batch_requests, max_batch_tokens, max_wait_s, fill_wait_s)
        self._jobs: dict[int, EmbedJob] = {}
        self._in_flight: list[Any] = []
        self.stats = {"requests": 0, "inputs": 0, "batches": 0, "batched_inputs": 0, "max_batch": 0, "tokens": 0}

    # -- event-loop thread -----------------------------------------------------------------------
    def submit(self, texts: list[str], priority: int = Priority.NORMAL) -> Channel:
        """Queue one request; admission counts inputs (a list of 100 texts costs 100)."""
        job_id = next(_ids)
        channel = self._channel(job_id)
        self._enqueue(_Pending(job_id, texts, channel, self._clock(), priority), cost=len(texts), priority=priority)
        return channel

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts as this model sees them (special tokens included). Any thread: the
        tokenizer is thread-safe; used to cut long texts into pieces the model accepts."""
        return self._embedder.count_tokens(texts)

    @property
    def max_length(self) -> int:
        return self._embedder.max_length

    def status(self) -> dict[str, Any]:
        return {"queued_inputs": self._batcher.num_queued, **self.stats}

    # -- engine thread ---------------------------------------------------------------------------
    def _cost(self, entry: _Pending) -> int:
        return len(entry.texts)

    def _accept(self, entries: list[_Pending], batch: Batch) -> None:
        limit = self._embedder.max_length
        for pending in entries:
            try:
                token_ids = self._embedder.tokenize(pending.texts)
            except Exception as exc:  # the tokenizer refused this request's text: fail it alone
                batch.append((pending.channel, Final(None, error=EngineFailure(f"tokenizer error: {type(exc).__name__}"))))
                continue
            too_long = next((i for i, ids in enumerate(token_ids) if len(ids) > limit), None)
            if too_long is not None:
                n = len(token_ids[too_long])
                error = InputTooLong(f"input[{too_long}] has {n} tokens; this model accepts at most {limit}")
                batch.append((pending.channel, Final(None, prompt_tokens=n, error=error)))
                continue
            job = EmbedJob(token_ids, arrival=pending.arrival, handle=pending.channel, priority=pending.priority)
            self._jobs[pending.job_id] = job
            self._batcher.add(job)

    def _cancel(self, request_ids: list[int]) -> None:
        for job_id in request_ids:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                job.cancelled = True

    def _has_work(self) -> bool:
        return self._batcher.num_queued > 0

    def _waiting(self) -> list[int]:
        return self._batcher.queued_by_class()

    def _priority(self, entry: _Pending) -> int:
        return entry.priority

    def _step(self, batch: Batch) -> float | None:
        now = self._clock()
        self._expire(now, batch)
        items, wait = self._batcher.next_batch(now)
        if not items:
            return wait
        self._in_flight = items
        vectors = self._embedder.embed([item.tokens for item in items])
        self._in_flight = []
        stats = self.stats
        stats["batches"] += 1
        stats["batched_inputs"] += len(items)
        stats["max_batch"] = max(stats["max_batch"], len(items))
        completed = 0
        for item, vector in zip(items, vectors):
            job = item.job
            job.results[item.index] = vector
            job.remaining -= 1
            if job.remaining == 0:
                self._finish(job, batch)
                completed += 1
        self._batcher.batch_done(completed)
        return None

    def _expire(self, now: float, batch: Batch) -> None:
        """Jobs that waited longer than the queue timeout without any input embedded yet."""
        limit = self._queue_timeout_s
        for job_id, job in list(self._jobs.items()):
            if job.remaining == len(job.token_ids) and now - job.arrival > limit:
                job.cancelled = True
                del self._jobs[job_id]
                batch.append((job.handle, Final(None, error=QueueTimedOut(f"waited more than {limit:g} s"))))

    def _finish(self, job: EmbedJob, batch: Batch) -> None:
        channel: Channel = job.handle
        self._jobs.pop(channel.request_id, None)
        tokens = job.num_tokens
        self.stats["requests"] += 1
        self.stats["inputs"] += len(job.token_ids)
        self.stats["tokens"] += tokens
        self._record_duration(self._clock() - job.arrival)
        batch.append((channel, Final("stop", prompt_tokens=tokens, payload=np.stack(job.results))))

    def _fail(self, batch: Batch, exc: Exception) -> None:
        """The model failed on a batch: fail the jobs that had an input in it, keep the rest."""
        for job in {id(item.job): item.job for item in self._in_flight}.values():
            job.cancelled = True
            channel: Channel = job.handle
            self._jobs.pop(channel.request_id, None)
            batch.append((channel, Final(None, error=EngineFailure(f"engine error: {type(exc).__name__}"))))
        self._in_flight = []

    def _entry_channel(self, entry: _Pending) -> Channel:
        return entry.channel

    def _open_channels(self) -> list[Channel]:
        channels = [job.handle for job in self._jobs.values()]
        self._jobs.clear()
        return channels

    def _reset(self) -> None:
        b = self._batcher
        self._batcher = DynamicBatcher(b.max_batch_requests, b.max_batch_tokens, b.max_wait_s, b.fill_wait_s)
        self._in_flight = []
