"""One generation request's state, shared by the scheduler (pure) and the engine (thread glue).

``Sequence`` is created by ``LlmEngine.submit`` (event-loop thread) and from then on is touched
only by the engine thread. The scheduler reads and writes ``status``, ``slot`` and
``num_computed``; the engine appends sampled tokens through the scheduler and reads the rest.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


class SequenceStatus(enum.IntEnum):
    """Ordered: every status above ``PREEMPTED`` is final (``is_finished``)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_TIMEOUT = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self > SequenceStatus.PREEMPTED


#: OpenAI ``finish_reason`` for the statuses a client can see a completion end with.
FINISH_REASON: dict[SequenceStatus, str] = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: str | None = None
    """A GBNF grammar (root rule ``root``) the output must follow: JSON mode and JSON schemas."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    prompt_tokens: list[int]
    max_tokens: int
    """Completion tokens allowed (already capped so prompt + completion fits the context)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    arrival: float = 0.0
    priority: int = 1
    """``models.priority.Priority``: a lower value is admitted first; arrival order within a class."""
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    num_computed: int = 0
    """Leading tokens of ``all_tokens`` whose KV is in the slot's cache."""
    num_cached: int = 0
    """Prompt tokens reused from the prefix cache at first admission (reported to the client)."""
    was_admitted: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) + len(self.output_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_tokens)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_tokens)
        return self.prompt_tokens[index] if index < n else self.output_tokens[index - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_tokens)
        if stop <= n:
            return self.prompt_tokens[start:stop]
        if start >= n:
            return self.output_tokens[start - n : stop - n]
        return self.prompt_tokens[start:] + self.output_tokens[: stop - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
