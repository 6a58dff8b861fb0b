"""Dynamic batching for embedding models: pure policy, no onnxruntime, no threads, no clock.

Shape of text-embeddings-inference's queue: each input text is one ``EmbedItem``; a request with
a list of inputs contributes several items, which may land in different batches. The engine
thread calls ``add()`` for new jobs and ``next_batch(now)`` whenever the model is free.

A batch takes items from the front of the queue, in arrival order, while
- it holds fewer than ``max_batch_requests`` items, and
- its padded cost (longest item × item count) stays within ``max_batch_tokens``;
the item that would overflow stays at the front for the next batch (a lone item larger than the
budget still runs, alone). Items of cancelled jobs are skipped. With ``max_wait_s > 0``, a batch
that is not full waits until its oldest item is ``max_wait_s`` old, hoping for company.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class EmbedJob:
    token_ids: list[list[int]]
    arrival: float = 0.0
    cancelled: bool = False
    results: list[Any] = field(default_factory=list)
    remaining: int = 0
    handle: Any = None

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


class DynamicBatcher:
    def __init__(self, max_batch_requests: int, max_batch_tokens: int, max_wait_s: float = 0.0) -> None:
        if max_batch_requests < 1 or max_batch_tokens < 1:
            raise ValueError("batch limits must be positive")
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.queue: deque[EmbedItem] = deque()

    @property
    def num_queued(self) -> int:
        return len(self.queue)

    def add(self, job: EmbedJob) -> None:
        self.queue.extend(EmbedItem(job, i) for i in range(len(job.token_ids)))

    def next_batch(self, now: float) -> tuple[list[EmbedItem], float | None]:
        """``(batch, None)`` to run now; ``([], seconds)`` to wait for company; ``([], None)`` when empty."""
        queue = self.queue
        batch: list[EmbedItem] = []
        longest = 0
        full = False
        while queue:
            item = queue[0]
            if item.job.cancelled:
                queue.popleft()
                continue
            n = len(item.tokens)
            grown = max(longest, n)
            if batch and (len(batch) == self.max_batch_requests or grown * (len(batch) + 1) > self.max_batch_tokens):
                full = True
                break
            queue.popleft()
            batch.append(item)
            longest = grown
        if len(batch) == self.max_batch_requests:
            full = True
        if batch and not full and self.max_wait_s > 0:
            waited = now - min(i.job.arrival for i in batch)
            if waited < self.max_wait_s:
                queue.extendleft(reversed(batch))
                return [], self.max_wait_s - waited
        return batch, None
