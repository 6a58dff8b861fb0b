"""Continuous-batching scheduler for one LLM: pure policy, no model, no threads, no clock.

Imports neither llama_cpp nor onnxruntime; unit-tested with a fake runner (tests/test_scheduler.py).

The engine thread calls, once per step::

    out = scheduler.schedule(now)                 # what to feed the model this step
    sampled = runner.run(out)                     # one llama_decode for every chunk
    scheduler.update_from_output(out, sampled)    # append tokens, finish sequences

plus ``add()`` for new requests and ``finish()`` for stop strings and client disconnects, all on
the engine thread.

Policy (vLLM v1's shape, llama.cpp server's slots):
- One token budget (``max_batch_tokens``) per step covers decode and chunked prefill alike: a
  sequence is fed ``num_tokens - num_computed`` tokens, capped by what is left of the budget.
  Running sequences go first, in admission order (so decodes never starve), then waiting ones
  are admitted while a slot is free and budget remains: by priority class
  (``models.priority``), then in arrival order. A running sequence is never displaced by a
  higher class: priority decides who gets the next free slot.
- Each slot remembers the tokens its KV cells hold. A new sequence takes the free slot that
  maximises ``shared prefix - DISCARD_WEIGHT × cached tokens it would throw away`` and skips
  recomputing the shared prefix (prefix cache). So a repeated prompt or the next turn of a
  conversation goes back to its own slot, while a prompt that only shares a system prompt does
  not wipe another conversation's long cache when an empty slot is free. Ties go to an empty
  slot, then to the least recently used one. (Slots cannot share cells: with one KV stream per
  slot, a cross-slot copy would move the whole stream.)
- KV accounting. ``kv_per_slot=True``: every slot owns ``kv_capacity // num_slots`` cells and a
  sequence may never exceed that (``add`` refuses it; ``server.local`` turns that limit into the
  model's context length for clients), so nothing is preempted.
  ``kv_per_slot=False`` (one shared pool): when the pool is short, cached prefixes of idle slots
  are dropped first (least recently used first), then the most recently admitted running
  sequence is preempted: its cells are freed and it goes back to the front of the waiting queue
  to be recomputed (prompt + what it already generated) when room returns. Nothing is lost.
- A sequence that waited longer than ``queue_timeout_s`` without ever being admitted finishes
  with ``FINISHED_TIMEOUT``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

from models.sequence import Sequence, SequenceStatus

#: How much a cached token thrown away counts against a reused one when choosing a slot.
DISCARD_WEIGHT = 0.5


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int
    max_batch_tokens: int
    kv_capacity: int
    kv_per_slot: bool = False
    queue_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_batch_tokens < 1 or self.kv_capacity < self.num_slots:
            raise ValueError(f"invalid scheduler config: {self}")

    @property
    def max_seq_tokens(self) -> int:
        """Longest sequence (prompt + completion) a slot can hold."""
        return self.kv_capacity // self.num_slots if self.kv_per_slot else self.kv_capacity


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)
    """Tokens at positions 0..len-1 whose KV cells this slot (llama seq_id == index) holds."""
    seq: Sequence | None = None
    last_used: int = 0

    @property
    def is_free(self) -> bool:
        return self.seq is None


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    """Position of the first token fed (== ``seq.num_computed`` when scheduled)."""
    num_tokens: int
    needs_sample: bool
    """The chunk reaches the last known token: the runner samples the next one."""


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    kv_clears: list[tuple[int, int]] = field(default_factory=list)
    """(slot, from_pos): drop the slot's cells at positions >= from_pos, before running the chunks."""
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    timed_out: list[Sequence] = field(default_factory=list)

    @property
    def num_batch_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.slots = [Slot(i) for i in range(config.num_slots)]
        self._kv_used = 0
        self._step = 0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests never admitted yet (preempted ones already hold a place and are not counted)."""
        return sum(1 for s in self.waiting if not s.was_admitted)

    def waiting_by_class(self) -> list[int]:
        """``num_waiting`` per priority class (``models.priority``)."""
        out = [0] * 4
        for s in self.waiting:
            if not s.was_admitted:
                out[min(s.priority, 3)] += 1
        return out

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_used(self) -> int:
        return self._kv_used

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- commands (engine thread) ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.config.max_seq_tokens:
            raise ValueError(f"sequence of {seq.num_tokens} tokens exceeds {self.config.max_seq_tokens}")
        seq.status = SequenceStatus.WAITING
        # Higher classes first, arrival order within a class; preempted sequences (already
        # admitted once) keep their place at the front whatever their class.
        waiting = self.waiting
        i = len(waiting)
        while i > 0 and not waiting[i - 1].was_admitted and waiting[i - 1].priority > seq.priority:
            i -= 1
        waiting.insert(i, seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End ``seq`` (stop string, client gone, error). Its slot keeps its KV for prefix reuse."""
        assert status.is_finished
        if seq.status.is_finished:
            return
        if seq.slot is not None:
            self.running.remove(seq)
            self._release_slot(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = status

    def reset_slot(self, index: int) -> None:
        """Forget a free slot's cached tokens (the runner cleared its cells, e.g. after an error)."""
        slot = self.slots[index]
        assert slot.is_free
        if not self.config.kv_per_slot:
            self._kv_used -= len(slot.tokens)
        slot.tokens.clear()

    def schedule(self, now: float) -> SchedulerOutput:
        self._step += 1
        out = SchedulerOutput()
        self._expire_waiting(now, out)
        budget = self.config.max_batch_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(n, out, protect=seq):
                self._preempt(seq, out)
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            picked = self._pick_slot(seq)
            if picked is None:
                break
            slot, keep = picked
            self._truncate_slot(slot, keep, out)
            n = min(seq.num_tokens - keep, budget)
            if not self._make_room(n, out, protect=None, reserve=slot):
                break
            self.waiting.popleft()
            slot.seq = seq
            seq.slot = slot.index
            seq.status = SequenceStatus.RUNNING
            seq.num_computed = keep
            if not seq.was_admitted:
                seq.num_cached = keep
                seq.was_admitted = True
            self.running.append(seq)
            out.admitted.append(seq)
            out.chunks.append(ScheduledChunk(seq, keep, n, keep + n == seq.num_tokens))
            budget -= n
        return out

    def update_from_output(
        self, out: SchedulerOutput, sampled: Mapping[int, int], eog: Container[int]
    ) -> list[Sequence]:
        """Record what the runner computed; returns the sequences that received a new token."""
        grown = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            slot = self.slots[seq.slot]  # type: ignore[index]
            slot.tokens.extend(seq.tokens(chunk.start, chunk.start + chunk.num_tokens))
            seq.num_computed += chunk.num_tokens
            if not self.config.kv_per_slot:
                self._kv_used += chunk.num_tokens
            if not chunk.needs_sample:
                continue
            token = sampled[seq.seq_id]
            seq.output_tokens.append(token)
            grown.append(seq)
            if token in eog:
                self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            elif len(seq.output_tokens) >= seq.max_tokens:
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)
        return grown

    # -- internals -------------------------------------------------------------------------------
    def _expire_waiting(self, now: float, out: SchedulerOutput) -> None:
        limit = self.config.queue_timeout_s
        for seq in [s for s in self.waiting if not s.was_admitted and now - s.arrival > limit]:
            self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED_TIMEOUT
            out.timed_out.append(seq)

    def _pick_slot(self, seq: Sequence) -> tuple[Slot, int] | None:
        """The free slot to run ``seq`` in and how many of its leading tokens that slot already holds.

        At least one token is always left to compute (its logits give the first sampled token).
        """
        best: tuple[Slot, int] | None = None
        best_key: tuple[float, bool, int] | None = None
        first = seq.token_at(0)
        limit = seq.num_tokens - 1
        for slot in self.slots:
            if not slot.is_free:
                continue
            n = 0
            if slot.tokens and slot.tokens[0] == first and limit > 0:
                n = common_prefix_len(slot.tokens, seq.tokens(0, min(seq.num_tokens, len(slot.tokens))), limit)
            key = (n - DISCARD_WEIGHT * (len(slot.tokens) - n), not slot.tokens, -slot.last_used)
            if best_key is None or key > best_key:
                best, best_key = (slot, n), key
        return best

    def _truncate_slot(self, slot: Slot, keep: int, out: SchedulerOutput) -> None:
        if len(slot.tokens) > keep:
            out.kv_clears.append((slot.index, keep))
            if not self.config.kv_per_slot:
                self._kv_used -= len(slot.tokens) - keep
            del slot.tokens[keep:]

    def _make_room(self, n: int, out: SchedulerOutput, protect: Sequence | None, reserve: Slot | None = None) -> bool:
        """Ensure ``n`` more cells fit in the pool: drop idle caches, then preempt newer sequences."""
        if self.config.kv_per_slot:
            return True
        cap = self.config.kv_capacity
        if self._kv_used + n <= cap:
            return True
        idle = sorted((s for s in self.slots if s.is_free and s.tokens and s is not reserve), key=lambda s: s.last_used)
        for slot in idle:
            self._truncate_slot(slot, 0, out)
            if self._kv_used + n <= cap:
                return True
        if protect is None:
            return False  # never preempt running work to admit a new request
        for victim in reversed(self.running):
            if victim is protect:
                return False
            self._preempt(victim, out)
            if self._kv_used + n <= cap:
                return True
        return False

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        slot = self.slots[seq.slot]  # type: ignore[index]
        self.running.remove(seq)
        self._release_slot(seq)
        self._truncate_slot(slot, 0, out)
        seq.num_computed = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.chunks = [c for c in out.chunks if c.seq is not seq]

    def _release_slot(self, seq: Sequence) -> None:
        slot = self.slots[seq.slot]  # type: ignore[index]
        slot.seq = None
        slot.last_used = self._step
        seq.slot = None
