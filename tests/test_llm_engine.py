"""The LLM engine thread with a fake runner: text assembly, stop strings, cancellation, admission, failures."""

from __future__ import annotations

import asyncio

import pytest

from models.bridge import Delta, Final
from models.engine_base import EngineFailure, EngineOverloaded
from models.llm_engine import LlmEngine
from models.scheduler import SchedulerConfig, SchedulerOutput
from models.sequence import SamplingParams
from tests.fake_runner import FakeRunner

# token id -> bytes; 9 is end-of-generation
PIECES = [b"", b"Hel", b"lo", b" wor", b"ld", b" ##", b"#", b" STOP", "\u2603".encode()[:2], b""]
EOG = frozenset({9})


def script(tokens: list[int]):  # type: ignore[no-untyped-def]
    return lambda seq: tokens[len(seq.output_tokens)] if len(seq.output_tokens) < len(tokens) else 9


async def collect(channel) -> tuple[str, Final]:  # type: ignore[no-untyped-def]
    text = ""
    while True:
        for item in await channel.get():
            if isinstance(item, Delta):
                text += item.text
            elif isinstance(item, Final):
                return text, item


def engine(runner: FakeRunner, slots: int = 2, max_waiting: int = 8) -> LlmEngine:
    config = SchedulerConfig(num_slots=slots, max_batch_tokens=64, kv_capacity=slots * 256, kv_per_slot=True)
    return LlmEngine("fake", runner, config, PIECES, EOG, max_waiting)


def test_text_usage_and_stop_at_end_of_generation() -> None:
    async def go() -> tuple[str, Final]:
        eng = engine(FakeRunner(2, script([1, 2, 3, 4])))
        eng.start(asyncio.get_running_loop())
        try:
            return await collect(eng.submit([5, 6, 7], 50, SamplingParams()))
        finally:
            await asyncio.to_thread(eng.stop)

    text, final = asyncio.run(go())
    assert text == "Hello world"
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("stop", 3, 5)


def test_stop_string_split_over_tokens_is_cut_and_the_slot_freed() -> None:
    async def go() -> tuple[str, Final, dict]:
        eng = engine(FakeRunner(1, script([1, 2, 5, 6, 6, 3, 4])))
        eng.start(asyncio.get_running_loop())
        try:
            text, final = await collect(eng.submit([5, 6, 7], 50, SamplingParams(), stop=("###",)))
            return text, final, eng.status()
        finally:
            await asyncio.to_thread(eng.stop)

    text, final, status = asyncio.run(go())
    assert text == "Hello " and final.finish_reason == "stop"
    assert status["running"] == 0


def test_max_tokens_gives_length() -> None:
    async def go() -> tuple[str, Final]:
        eng = engine(FakeRunner(1, script([1, 2, 3, 4, 3, 4])))
        eng.start(asyncio.get_running_loop())
        try:
            return await collect(eng.submit([5], 3, SamplingParams()))
        finally:
            await asyncio.to_thread(eng.stop)

    text, final = asyncio.run(go())
    assert text == "Hello wor" and final.finish_reason == "length" and final.completion_tokens == 3


def test_cancel_frees_the_slot_for_the_next_request() -> None:
    async def go() -> tuple[str, Final]:
        forever = FakeRunner(1, lambda seq: 3)  # never ends on its own
        eng = engine(forever, slots=1)
        eng.start(asyncio.get_running_loop())
        try:
            first = eng.submit([5], 10_000, SamplingParams())
            await first.get()
            second = eng.submit([6], 2, SamplingParams())
            first.cancel()
            return await asyncio.wait_for(collect(second), 5)
        finally:
            await asyncio.to_thread(eng.stop)

    text, final = asyncio.run(go())
    assert final.finish_reason == "length" and text == " wor wor"


def test_full_queue_is_refused_at_once() -> None:
    async def go() -> None:
        eng = engine(FakeRunner(1, lambda seq: 3), slots=1, max_waiting=2)
        eng.start(asyncio.get_running_loop())
        try:
            channels = [eng.submit([5], 10_000, SamplingParams()) for _ in range(2)]
            with pytest.raises(EngineOverloaded) as info:
                eng.submit([5], 1, SamplingParams())
            assert info.value.retry_after >= 1
            for ch in channels:
                ch.cancel()
        finally:
            await asyncio.to_thread(eng.stop)

    asyncio.run(go())


class ExplodingRunner(FakeRunner):
    def __init__(self) -> None:
        super().__init__(2)
        self.calls = 0

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("llama_decode returned -3")
        return super().run(out)


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving() -> None:
    async def go() -> tuple[Final, Final]:
        runner = ExplodingRunner()
        runner.next_token = script([1, 2])
        eng = engine(runner)
        eng.start(asyncio.get_running_loop())
        try:
            _, failed = await collect(eng.submit([5, 6], 50, SamplingParams()))
            _, ok = await collect(eng.submit([5, 6], 50, SamplingParams()))
            return failed, ok
        finally:
            await asyncio.to_thread(eng.stop)

    failed, ok = asyncio.run(go())
    assert isinstance(failed.error, EngineFailure)
    assert ok.error is None and ok.finish_reason == "stop"


class SlowEmbedder:
    max_length = 16
    dimensions = 2

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[1, 2, 3] for _ in texts]

    def embed(self, batch: list[list[int]]):  # type: ignore[no-untyped-def]
        import time

        import numpy as np

        time.sleep(0.3)
        return np.ones((len(batch), 2), dtype=np.float32)


def test_embedding_request_waiting_past_the_queue_timeout_fails_with_queue_timeout() -> None:
    from models.embed_engine import EmbedEngine
    from models.engine_base import QueueTimedOut

    async def go() -> tuple[Final, Final]:
        eng = EmbedEngine("fake-embed", SlowEmbedder(), max_batch_requests=1, max_batch_tokens=64, max_waiting=8, queue_timeout_s=0.1)
        eng.start(asyncio.get_running_loop())
        try:
            first = eng.submit(["a"])
            await asyncio.sleep(0.05)
            second = eng.submit(["b"])
            _, a = await collect(first)
            _, b = await collect(second)
            return a, b
        finally:
            await asyncio.to_thread(eng.stop)

    a, b = asyncio.run(go())
    assert a.error is None and a.payload.shape == (1, 2)
    assert isinstance(b.error, QueueTimedOut)


def test_a_request_the_scheduler_refuses_fails_alone() -> None:
    """A prompt longer than a slot holds reaches the engine (a caller that skipped validation):
    it gets an error, and the requests queued with it in the same step are still answered."""
    from models.engine_base import InputTooLong

    async def go() -> list[tuple[str, Final]]:
        eng = engine(FakeRunner(2, script([1, 2])))
        eng.start(asyncio.get_running_loop())
        try:
            channels = [eng.submit([5, 6], 10, SamplingParams()), eng.submit([5] * 300, 10, SamplingParams()),
                        eng.submit([6, 7], 10, SamplingParams())]
            return await asyncio.wait_for(asyncio.gather(*[collect(c) for c in channels]), 10)
        finally:
            await asyncio.to_thread(eng.stop)

    first, refused, last = asyncio.run(go())
    assert isinstance(refused[1].error, InputTooLong) and "exceeds" in str(refused[1].error)
    assert first == ("Hello", first[1]) and first[1].finish_reason == "stop"
    assert last[0] == "Hello" and last[1].error is None


class BrokenRunner(FakeRunner):
    """A decode fails and so does the first wipe of a slot afterwards (``_fail`` itself raises)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.broken = True
        self.clear_failures = 1

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        if self.broken and any(c.seq.output_tokens for c in out.chunks):
            raise RuntimeError("llama_decode returned -3")
        return super().run(out)

    def clear_slot(self, slot: int) -> None:
        if self.clear_failures:
            self.clear_failures -= 1
            raise RuntimeError("llama_memory_seq_rm failed")
        super().clear_slot(slot)


def test_when_recovery_fails_too_every_open_request_gets_an_error_and_the_engine_keeps_serving() -> None:
    """Two requests running and one waiting when the failure hits, plus a cancellation queued
    in the same wake: all three submitters get an answer (an error), none waits forever, and
    the next request after the failure is served normally."""

    async def go() -> tuple[list[Final], tuple[str, Final]]:
        runner = BrokenRunner()
        runner.next_token = script([1, 2, 3, 4])
        eng = engine(runner, slots=2)
        eng.start(asyncio.get_running_loop())
        try:
            channels = [eng.submit([5, 6], 10, SamplingParams()) for _ in range(3)]
            cancelled = eng.submit([7, 8], 10, SamplingParams())
            cancelled.cancel()
            finals = [f for _, f in await asyncio.wait_for(asyncio.gather(*[collect(c) for c in channels]), 10)]
            runner.broken = False
            after = await asyncio.wait_for(collect(eng.submit([5, 6], 10, SamplingParams())), 10)
            return finals, after
        finally:
            await asyncio.to_thread(eng.stop)

    finals, after = asyncio.run(go())
    assert all(isinstance(f.error, EngineFailure) for f in finals)
    assert after[0] == "Hello world" and after[1].error is None and after[1].finish_reason == "stop"
