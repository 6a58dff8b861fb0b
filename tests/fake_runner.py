"""A faithful stand-in for ``LlamaRunner``: it keeps each slot's KV as a token list and checks
that every chunk the scheduler sends continues exactly what that slot holds."""

from __future__ import annotations

from collections.abc import Callable

from models.scheduler import Scheduler, SchedulerOutput
from models.sequence import Sequence


class FakeRunner:
    def __init__(self, num_slots: int, next_token: Callable[[Sequence], int] | None = None) -> None:
        self.kv: dict[int, list[int]] = {i: [] for i in range(num_slots)}
        self.next_token = next_token or (lambda seq: 1000 + len(seq.output_tokens))
        self.batch_sizes: list[int] = []
        self.released: list[int] = []

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        for slot, start in out.kv_clears:
            del self.kv[slot][start:]
        sampled: dict[int, int] = {}
        for chunk in out.chunks:
            seq = chunk.seq
            kv = self.kv[seq.slot]
            assert len(kv) == chunk.start, f"slot {seq.slot} holds {len(kv)} tokens, chunk starts at {chunk.start}"
            assert kv == seq.tokens(0, chunk.start), "the slot's cache is not this sequence's prefix"
            kv.extend(seq.tokens(chunk.start, chunk.start + chunk.num_tokens))
            if chunk.needs_sample:
                sampled[seq.seq_id] = self.next_token(seq)
        if out.chunks:
            self.batch_sizes.append(out.num_batch_tokens)
        return sampled

    def release(self, seq: Sequence) -> None:
        self.released.append(seq.seq_id)

    def clear_slot(self, slot: int) -> None:
        self.kv[slot].clear()

    def close(self) -> None:
        pass

    def cells_used(self) -> int:
        return sum(len(v) for v in self.kv.values())


def step(scheduler: Scheduler, runner: FakeRunner, now: float = 0.0, eog: frozenset[int] = frozenset()) -> SchedulerOutput:
    out = scheduler.schedule(now)
    sampled = runner.run(out)
    scheduler.update_from_output(out, sampled, eog)
    return out
