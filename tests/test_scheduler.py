"""The continuous-batching scheduler, driven with a fake runner (no model)."""

from __future__ import annotations

import pytest

from models.scheduler import Scheduler, SchedulerConfig, common_prefix_len
from models.sequence import Sequence, SequenceStatus
from tests.fake_runner import FakeRunner, step


def make(num_slots: int = 2, budget: int = 64, kv: int = 1024, per_slot: bool = False, timeout: float = 60.0) -> tuple[Scheduler, FakeRunner]:
    config = SchedulerConfig(num_slots=num_slots, max_batch_tokens=budget, kv_capacity=kv, kv_per_slot=per_slot, queue_timeout_s=timeout)
    return Scheduler(config), FakeRunner(num_slots)


def seq(prompt: list[int] | int, max_tokens: int = 4, arrival: float = 0.0) -> Sequence:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    return Sequence(prompt_tokens=tokens, max_tokens=max_tokens, arrival=arrival)


def test_admits_up_to_the_number_of_slots_and_queues_the_rest_in_order() -> None:
    s, r = make(num_slots=2)
    a, b, c = seq(5), seq(5), seq(5)
    for x in (a, b, c):
        s.add(x)
    out = step(s, r)
    assert [x.seq_id for x in out.admitted] == [a.seq_id, b.seq_id]
    assert list(s.waiting) == [c]
    assert c.status is SequenceStatus.WAITING


def test_finished_sequence_frees_its_slot_for_the_next_waiting_one() -> None:
    s, r = make(num_slots=1)
    a, b = seq(3, max_tokens=2), seq(3, max_tokens=2)
    s.add(a)
    s.add(b)
    step(s, r)  # a: prefill + first token
    step(s, r)  # a: second token -> length
    assert a.status is SequenceStatus.FINISHED_LENGTH
    assert a.output_tokens == [1000, 1001]
    out = step(s, r)
    assert out.admitted == [b]


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    s, r = make(num_slots=2, budget=8)
    a = seq(20, max_tokens=3)
    s.add(a)
    sizes = []
    while not a.is_finished:
        out = step(s, r)
        sizes.append([(c.num_tokens, c.needs_sample) for c in out.chunks])
    assert sizes == [[(8, False)], [(8, False)], [(4, True)], [(1, True)], [(1, True)]]
    assert a.output_tokens == [1000, 1001, 1002]


def test_running_decodes_go_before_new_prefill_and_share_one_batch() -> None:
    s, r = make(num_slots=2, budget=10)
    a = seq(4, max_tokens=10)
    s.add(a)
    step(s, r)
    b = seq(30, max_tokens=2)
    s.add(b)
    out = step(s, r)
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [(a.seq_id, 1), (b.seq_id, 9)]
    assert out.num_batch_tokens == 10


def test_prefix_cache_reuses_the_slot_with_the_longest_common_prefix() -> None:
    s, r = make(num_slots=2, budget=64)
    system = list(range(100, 120))
    a = seq(system + [1, 2, 3], max_tokens=1)
    other = seq([7, 8, 9, 10] * 10, max_tokens=1)
    s.add(a)
    s.add(other)
    step(s, r)
    assert a.is_finished and other.is_finished
    slot_of_a = next(sl.index for sl in s.slots if sl.tokens[:20] == system)
    b = seq(system + [4, 5], max_tokens=5)
    s.add(b)
    out = step(s, r)
    assert b.slot == slot_of_a
    assert b.num_cached == len(system)
    assert (out.chunks[0].start, out.chunks[0].num_tokens) == (len(system), 2)
    assert (slot_of_a, len(system)) in out.kv_clears  # a's own tail (1, 2, 3 and its answer) is dropped


def test_a_shared_system_prompt_does_not_wipe_a_long_cache_while_a_slot_is_empty() -> None:
    s, r = make(num_slots=2, budget=256)
    system = list(range(100, 110))
    a = seq(system + list(range(1, 60)), max_tokens=1)
    s.add(a)
    step(s, r)
    slot_a = next(sl.index for sl in s.slots if sl.tokens)
    b = seq(system + [7, 7, 7], max_tokens=1)
    s.add(b)
    out = step(s, r)
    assert b.slot != slot_a and b.num_cached == 0  # reusing 10 tokens would throw 50 away
    assert not any(slot == slot_a for slot, _ in out.kv_clears)
    again = seq(system + list(range(1, 60)), max_tokens=1)
    s.add(again)
    step(s, r)
    assert again.num_cached == len(again.prompt_tokens) - 1  # a's conversation was still there


def test_identical_prompt_recomputes_only_its_last_token() -> None:
    s, r = make(num_slots=1)
    a = seq(12, max_tokens=1)
    s.add(a)
    step(s, r)
    b = seq(12, max_tokens=1)
    s.add(b)
    out = step(s, r)
    assert b.num_cached == 11
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(11, 1)]


def test_cancelled_running_sequence_frees_its_slot_at_the_next_step() -> None:
    s, r = make(num_slots=1)
    a, b = seq(4, max_tokens=100), seq(4, max_tokens=2)
    s.add(a)
    s.add(b)
    step(s, r)
    step(s, r)
    assert b.status is SequenceStatus.WAITING
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    out = step(s, r)
    assert out.admitted == [b]
    assert a.status is SequenceStatus.FINISHED_ABORTED
    assert s.num_running == 1


def test_cancelled_waiting_sequence_leaves_the_queue() -> None:
    s, r = make(num_slots=1)
    a, b = seq(4), seq(4)
    s.add(a)
    s.add(b)
    step(s, r)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert list(s.waiting) == []
    assert s.num_waiting == 0


def test_end_of_generation_token_stops_the_sequence() -> None:
    s, r = make(num_slots=1)
    r.next_token = lambda q: 7 if len(q.output_tokens) == 2 else 1
    a = seq(3, max_tokens=50)
    s.add(a)
    while not a.is_finished:
        step(s, r, eog=frozenset({7}))
    assert a.status is SequenceStatus.FINISHED_STOPPED
    assert a.output_tokens == [1, 1, 7]


def test_waiting_past_the_queue_timeout_times_out() -> None:
    s, r = make(num_slots=1, timeout=5.0)
    a, b = seq(3, max_tokens=100, arrival=0.0), seq(3, arrival=1.0)
    s.add(a)
    s.add(b)
    step(s, r, now=1.0)
    out = step(s, r, now=5.5)
    assert out.timed_out == []
    out = step(s, r, now=6.5)
    assert out.timed_out == [b]
    assert b.status is SequenceStatus.FINISHED_TIMEOUT
    assert a.status is SequenceStatus.RUNNING


def test_short_kv_pool_preempts_the_newest_sequence_and_resumes_it_later() -> None:
    s, r = make(num_slots=2, budget=64, kv=24)
    a = seq(8, max_tokens=12)
    b = seq(8, max_tokens=12)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(100):
        if a.is_finished and b.is_finished:
            break
        out = step(s, r)
        preempted += out.preempted
        assert s.kv_used <= 24
        assert r.cells_used() == s.kv_used
    assert preempted and preempted[0] is b
    assert a.status is SequenceStatus.FINISHED_LENGTH and b.status is SequenceStatus.FINISHED_LENGTH
    # b kept what it had generated before preemption and continued from there
    assert b.output_tokens == [1000 + i for i in range(12)]


def test_idle_cached_prefixes_are_dropped_before_anything_is_preempted() -> None:
    s, r = make(num_slots=2, budget=64, kv=20)
    a = seq(10, max_tokens=1)
    s.add(a)
    step(s, r)
    assert s.kv_used == 10  # a finished, its prompt stays cached
    slot_of_a = next(sl.index for sl in s.slots if sl.tokens)
    b = seq([50 + i for i in range(15)], max_tokens=2)
    s.add(b)
    out = step(s, r)
    assert out.preempted == []
    assert b.slot != slot_of_a
    assert (slot_of_a, 0) in out.kv_clears
    assert s.kv_used == 15
    assert r.cells_used() == 15


def test_per_slot_mode_refuses_a_sequence_longer_than_a_slot() -> None:
    s, _ = make(num_slots=4, kv=64, per_slot=True)
    assert s.config.max_seq_tokens == 16
    with pytest.raises(ValueError):
        s.add(seq(17))


def test_budget_is_never_exceeded_under_many_requests() -> None:
    s, r = make(num_slots=4, budget=16, kv=4096)
    seqs = [seq(list(range(1, 10 + i)), max_tokens=5) for i in range(10)]
    for x in seqs:
        s.add(x)
    for _ in range(200):
        if all(x.is_finished for x in seqs):
            break
        step(s, r)
    assert all(x.status is SequenceStatus.FINISHED_LENGTH for x in seqs)
    assert max(r.batch_sizes) <= 16
    assert all(len(x.output_tokens) == 5 for x in seqs)


@pytest.mark.parametrize("a,b,limit,expected", [
    ([1, 2, 3], [1, 2, 3], 10, 3),
    ([1, 2, 3], [1, 2, 4], 10, 2),
    ([1, 2, 3], [1, 2, 3], 2, 2),
    ([], [1], 5, 0),
    (list(range(100)), list(range(57)) + [0], 200, 57),
])
def test_common_prefix_len(a: list[int], b: list[int], limit: int, expected: int) -> None:
    assert common_prefix_len(a, b, limit) == expected


def test_waiting_requests_are_admitted_by_priority_class_then_arrival() -> None:
    from models.priority import Priority

    s, r = make(num_slots=1)
    running = seq(3, max_tokens=50)
    s.add(running)
    step(s, r)
    low, normal1, normal2, high = seq(3), seq(3), seq(3), seq(3)
    low.priority, high.priority = Priority.LOW, Priority.HIGH
    for x in (low, normal1, normal2, high):
        s.add(x)
    assert list(s.waiting) == [high, normal1, normal2, low]
    s.finish(running, SequenceStatus.FINISHED_ABORTED)
    out = step(s, r)
    assert out.admitted == [high]  # the running request was never displaced; the free slot went to the high class
