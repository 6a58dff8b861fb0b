"""Priority classes of the local engines' queues.

Every engine queue that workloads share (the LLM scheduler's waiting queue, the embedding
batcher's queue) serves a higher class first, and arrival order within a class. The class of a
request comes from its workload (``[[workloads]] priority``); a request that names a model
directly is ``NORMAL``. ``BACKGROUND`` is below every class a workload can pick: it is for work
that must never delay a client (shadow evaluation and other background jobs).

Lower value = served first, so the classes sort naturally.
"""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2
    BACKGROUND = 3

    @classmethod
    def from_name(cls, name: str) -> "Priority":
        return cls[name.upper()]


#: The names a workload may choose in its config (background is reserved).
WORKLOAD_PRIORITIES = ("high", "normal", "low")
