"""Dynamic batching of embedding inputs (pure, no model)."""

from models.embed_batcher import DynamicBatcher, EmbedJob


def job(*lengths: int, arrival: float = 0.0) -> EmbedJob:
    return EmbedJob([[1] * n for n in lengths], arrival=arrival)


def sizes(batch: list) -> list[int]:
    return [len(i.tokens) for i in batch]


def test_batch_stops_at_max_requests_and_keeps_order() -> None:
    b = DynamicBatcher(max_batch_requests=3, max_batch_tokens=10_000)
    jobs = [job(5), job(6), job(7), job(8)]
    for j in jobs:
        b.add(j)
    batch, wait = b.next_batch(0.0)
    assert [i.job for i in batch] == jobs[:3] and wait is None
    batch, _ = b.next_batch(0.0)
    assert [i.job for i in batch] == jobs[3:]


def test_padded_cost_budget_leaves_the_overflowing_item_at_the_front() -> None:
    b = DynamicBatcher(max_batch_requests=32, max_batch_tokens=40)
    b.add(job(10, 10, 10, 30))  # 3 x 10 = 30 fits; 4 x 30 = 120 does not
    batch, _ = b.next_batch(0.0)
    assert sizes(batch) == [10, 10, 10]
    batch, _ = b.next_batch(0.0)
    assert sizes(batch) == [30]


def test_an_item_larger_than_the_budget_still_runs_alone() -> None:
    b = DynamicBatcher(max_batch_requests=8, max_batch_tokens=16)
    b.add(job(100, 2))
    assert sizes(b.next_batch(0.0)[0]) == [100]
    assert sizes(b.next_batch(0.0)[0]) == [2]


def test_a_large_input_list_is_split_across_batches() -> None:
    b = DynamicBatcher(max_batch_requests=4, max_batch_tokens=10_000)
    j = job(*[3] * 10)
    b.add(j)
    seen = []
    while b.num_queued:
        seen.append(len(b.next_batch(0.0)[0]))
    assert seen == [4, 4, 2]


def test_cancelled_jobs_are_skipped() -> None:
    b = DynamicBatcher(max_batch_requests=8, max_batch_tokens=10_000)
    gone, kept = job(4, 4), job(5)
    b.add(gone)
    b.add(kept)
    gone.cancelled = True
    batch, _ = b.next_batch(0.0)
    assert [i.job for i in batch] == [kept]
    assert b.num_queued == 0


def test_wait_window_holds_a_partial_batch_until_it_expires() -> None:
    b = DynamicBatcher(max_batch_requests=4, max_batch_tokens=10_000, max_wait_s=0.005)
    b.add(job(3, arrival=1.0))
    batch, wait = b.next_batch(1.001)
    assert batch == [] and wait is not None and abs(wait - 0.004) < 1e-9
    assert b.num_queued == 1
    b.add(job(3, 3, 3, arrival=1.002))
    batch, wait = b.next_batch(1.002)  # full now: no waiting
    assert len(batch) == 4 and wait is None


def test_wait_window_expired_runs_what_there_is() -> None:
    b = DynamicBatcher(max_batch_requests=4, max_batch_tokens=10_000, max_wait_s=0.005)
    b.add(job(3, arrival=1.0))
    batch, wait = b.next_batch(1.01)
    assert len(batch) == 1 and wait is None


def test_a_batch_holds_the_highest_class_present_in_arrival_order() -> None:
    from models.priority import Priority

    b = DynamicBatcher(max_batch_requests=3, max_batch_tokens=10_000)
    low = [EmbedJob([[1] * 4], priority=Priority.BACKGROUND) for _ in range(2)]
    normal = EmbedJob([[1] * 4], priority=Priority.NORMAL)
    high = [EmbedJob([[1] * 4], priority=Priority.HIGH) for _ in range(2)]
    for j in (*low, normal, *high):
        b.add(j)
    assert [i.job for i in b.next_batch(0.0)[0]] == high  # not topped up with the normal one
    assert [i.job for i in b.next_batch(0.0)[0]] == [normal]
    assert [i.job for i in b.next_batch(0.0)[0]] == low


def test_adaptive_fill_waits_for_the_clients_the_last_batch_answered() -> None:
    b = DynamicBatcher(max_batch_requests=32, max_batch_tokens=10_000, fill_wait_s=0.005)
    b.add(job(3, arrival=1.0))
    assert len(b.next_batch(1.0)[0]) == 1  # nothing ran before: no reason to wait
    b.batch_done(8)  # that batch answered 8 clients; they will be back
    b.add(job(3, arrival=2.0))
    batch, wait = b.next_batch(2.001)
    assert batch == [] and wait is not None and abs(wait - 0.004) < 1e-9
    for _ in range(7):
        b.add(job(3, arrival=2.002))
    assert len(b.next_batch(2.002)[0]) == 8  # as many as came back: run at once
    b.batch_done(1)
    b.add(job(3, arrival=3.0))
    assert len(b.next_batch(3.0)[0]) == 1  # light load: never waits
    b.batch_done(8)
    b.add(job(3, arrival=4.0))
    assert len(b.next_batch(4.006)[0]) == 1  # the window has passed: run what there is


def test_background_work_runs_in_small_batches_so_a_real_request_waits_one_short_step() -> None:
    from models.embed_batcher import BACKGROUND_BATCH
    from models.priority import Priority

    b = DynamicBatcher(max_batch_requests=32, max_batch_tokens=10_000)
    b.add(EmbedJob([[1] * 8] * 40, priority=Priority.BACKGROUND))  # 40 shadow inputs
    first, _ = b.next_batch(0.0)
    assert len(first) == BACKGROUND_BATCH
    b.add(EmbedJob([[1] * 8] * 3, priority=Priority.HIGH))  # a real request arrives meanwhile
    nxt, _ = b.next_batch(0.0)
    assert len(nxt) == 3 and all(item.job.priority == Priority.HIGH for item in nxt)
    b.add(EmbedJob([[1] * 8] * 40, priority=Priority.NORMAL))
    assert len(b.next_batch(0.0)[0]) == 32  # real work keeps its full batches
