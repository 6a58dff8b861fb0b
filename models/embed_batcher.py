"""Dynamic batching for embedding models: pure policy, no onnxruntime, no threads, no clock.

Shape of text-embeddings-inference's queue: each input text is one ``EmbedItem``; a request with
a list of inputs contributes several items, which may land in different batches. The engine
thread calls ``add()`` for new jobs, ``next_batch(now)`` whenever the model is free, and
``batch_done(n)`` after each batch with the number of jobs it completed.

A batch holds items of one priority class (``models.priority``): the highest class that has
any, in arrival order. A triage request queued behind a summary of a 20-page note therefore
waits for at most the batch that is running, and then runs in a batch of its own class, not in
one filled up with the note's sentences. The batch takes items while
- it holds fewer than ``max_batch_requests`` items, and
- its padded cost (longest item × item count) stays within ``max_batch_tokens``;
the item that would overflow stays at the front for the next batch (a lone item larger than the
budget still runs, alone). Items of cancelled jobs are skipped.

Waiting for company (a partial batch is held back, never past its oldest item's deadline):
- ``max_wait_s > 0``: until the oldest item is ``max_wait_s`` old (a fixed window);
- ``fill_wait_s > 0`` (adaptive, on by default): when the previous batch completed more jobs than
  are queued now, the clients it answered are likely to send their next request within a few
  milliseconds (closed-loop clients, a burst being fed through HTTP). Running a batch of 3 while
  29 requests are about to arrive would take both cores from the event loop that is parsing them,
  and the next batch would be small again. So the batch waits until it holds as many jobs as the
  previous batch completed, or until its oldest item is ``fill_wait_s`` old. At low load (the
  previous batch completed one job) it never waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from models.priority import Priority


@dataclass(eq=False)
class EmbedJob:
    token_ids: list[list[int]]
    arrival: float = 0.0
    cancelled: bool = False
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    handle: Any = None
    priority: int = Priority.NORMAL

    def __post_init__(self) -> None:
        self.results = [None] * len(self.token_ids)
        self.remaining = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass(slots=True)
class EmbedItem:
    job: EmbedJob
    index: int

    @property
    def tokens(self) -> list[int]:
        return self.job.token_ids[self.index]


#: The largest batch of background-class inputs (``Priority.BACKGROUND``).
BACKGROUND_BATCH = 4


class DynamicBatcher:
    def __init__(self, max_batch_requests: int, max_batch_tokens: int, max_wait_s: float = 0.0,
                 fill_wait_s: float = 0.0) -> None:
        if max_batch_requests < 1 or max_batch_tokens < 1:
            raise ValueError("batch limits must be positive")
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.fill_wait_s = fill_wait_s
        self.queues: list[deque[EmbedItem]] = [deque() for _ in Priority]
        self._num_queued = 0
        self._last_jobs = 0

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def queued_by_class(self) -> list[int]:
        return [len(q) for q in self.queues]

    def add(self, job: EmbedJob) -> None:
        self.queues[job.priority].extend(EmbedItem(job, i) for i in range(len(job.token_ids)))
        self._num_queued += len(job.token_ids)

    def batch_done(self, jobs_completed: int) -> None:
        """The engine ran a batch that completed ``jobs_completed`` jobs (feeds the adaptive wait)."""
        self._last_jobs = jobs_completed

    def next_batch(self, now: float) -> tuple[list[EmbedItem], float | None]:
        """``(batch, None)`` to run now; ``([], seconds)`` to wait for company; ``([], None)`` when empty."""
        batch: list[EmbedItem] = []
        taken: list[deque[EmbedItem]] = []
        longest = 0
        full = False
        limit = self.max_batch_requests
        for cls, queue in enumerate(self.queues):
            # Background work (shadow mode, a head's training) runs in small batches, so that a
            # real request arriving meanwhile waits for one short step, not a batch of 32.
            limit = min(self.max_batch_requests, BACKGROUND_BATCH) if cls == Priority.BACKGROUND else self.max_batch_requests
            while queue:
                item = queue[0]
                if item.job.cancelled:
                    queue.popleft()
                    self._num_queued -= 1
                    continue
                grown = max(longest, len(item.tokens))
                if batch and (len(batch) == limit or grown * (len(batch) + 1) > self.max_batch_tokens):
                    full = True
                    break
                queue.popleft()
                taken.append(queue)
                batch.append(item)
                longest = grown
            if full or batch:
                break  # one class per batch
        self._num_queued -= len(batch)
        if len(batch) == limit:
            full = True
        if batch and not full:
            wait = self._company_wait(batch, now)
            if wait is not None:
                for queue, item in zip(reversed(taken), reversed(batch)):
                    queue.appendleft(item)
                self._num_queued += len(batch)
                return [], wait
        return batch, None

    def _company_wait(self, batch: list[EmbedItem], now: float) -> float | None:
        waited = now - min(i.job.arrival for i in batch)
        waits = []
        if self.max_wait_s > 0 and waited < self.max_wait_s:
            waits.append(self.max_wait_s - waited)
        if self.fill_wait_s > 0 and waited < self.fill_wait_s:
            jobs = len({id(i.job) for i in batch})
            if jobs < self._last_jobs:
                waits.append(self.fill_wait_s - waited)
        return max(waits) if waits else None
