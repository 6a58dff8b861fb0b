"""One GGUF model's engine: the engine thread (``EngineThread``) plus continuous batching.

Each step: ``scheduler.schedule() → runner.run() → scheduler.update_from_output()``, then new
tokens become text (``TextStream``: UTF-8 reassembly and stop strings) and every result of the
step goes to the event loop in one post. The runner is injected (``LlamaRunner`` in production,
a fake in tests) together with the vocabulary's token pieces and end-of-generation tokens.

``submit()`` runs on the event-loop thread; everything else here runs on the engine thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol

from models.bridge import Channel, Delta, Final
from models.engine_base import Batch, EngineFailure, EngineThread, InputTooLong, QueueTimedOut
from models.priority import Priority
from models.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from models.sequence import FINISH_REASON, SamplingParams, Sequence, SequenceStatus
from models.textstream import TextStream


class Runner(Protocol):
    """What the engine needs of ``LlamaRunner`` (an optional ``warm_up()`` runs first, on the engine thread)."""

    def run(self, out: SchedulerOutput) -> dict[int, int]: ...
    def release(self, seq: Sequence) -> None: ...
    def clear_slot(self, slot: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Live:
    seq: Sequence
    channel: Channel
    text: TextStream


class LlmEngine(EngineThread):
    def __init__(
        self,
        name: str,
        runner: Runner,
        config: SchedulerConfig,
        pieces: Seq[bytes],
        eog: frozenset[int],
        max_waiting: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, max_waiting, config.num_slots, clock)
        self.config = config
        self._runner = runner
        self._scheduler = Scheduler(config)
        self._pieces = pieces
        self._eog = eog
        self._live: dict[int, _Live] = {}
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "preemptions": 0,
                      "steps": 0, "max_running": 0}
        self._snapshot = {"running": 0, "waiting": 0, "kv_used": 0}

    # -- event-loop thread -----------------------------------------------------------------------
    def submit(self, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams, stop: tuple[str, ...] = (),
               priority: int = Priority.NORMAL) -> Channel:
        """Queue a request; raises ``EngineOverloaded`` at once when the waiting queue is full."""
        seq = Sequence(prompt_tokens=prompt_tokens, max_tokens=max_tokens, sampling=sampling, stop=stop, arrival=self._clock(),
                       priority=priority)
        channel = self._channel(seq.seq_id)
        self._enqueue(_Live(seq, channel, TextStream(stop)), priority=priority)
        return channel

    def status(self) -> dict[str, Any]:
        """Any thread (figures may be one step stale). ``busy_s`` is the engine thread's working
        time and ``decode_s`` the part of it inside ``llama_decode``: the rest, per step
        (``python_ms_per_step``), is this engine's own Python work between two decodes."""
        steps = self.stats["steps"]
        decode_s = getattr(self._runner, "decode_s", 0.0)
        return {**self._snapshot, "slots": self.config.num_slots, "kv_capacity": self.config.kv_capacity, **self.stats,
                "busy_s": round(self.busy_s, 3), "decode_s": round(decode_s, 3),
                "python_ms_per_step": round((self.busy_s - decode_s) * 1000 / steps, 3) if steps else None}

    # -- engine thread ---------------------------------------------------------------------------
    def _thread_start(self) -> None:
        warm_up = getattr(self._runner, "warm_up", None)
        if warm_up is not None:
            warm_up()

    def _accept(self, entries: list[_Live], batch: Batch) -> None:
        for live in entries:
            try:
                self._scheduler.add(live.seq)
            except Exception as exc:  # refused (e.g. longer than a slot holds): this request fails, no other
                error = InputTooLong(str(exc)) if isinstance(exc, ValueError) else EngineFailure(f"engine error: {type(exc).__name__}")
                batch.append((live.channel, Final(None, prompt_tokens=live.seq.num_prompt_tokens, error=error)))
                continue
            self._live[live.seq.seq_id] = live

    def _cancel(self, request_ids: list[int]) -> None:
        for seq_id in request_ids:
            live = self._live.pop(seq_id, None)
            if live is not None:
                self._scheduler.finish(live.seq, SequenceStatus.FINISHED_ABORTED)
                self._runner.release(live.seq)

    def _has_work(self) -> bool:
        return self._scheduler.has_work

    def _waiting(self) -> list[int]:
        return self._scheduler.waiting_by_class()

    def _priority(self, entry: _Live) -> int:
        return entry.seq.priority

    def _step(self, batch: Batch) -> float | None:
        sched = self._scheduler
        out = sched.schedule(self._clock())
        for seq in out.timed_out:
            live = self._live.pop(seq.seq_id)
            batch.append((live.channel, Final(None, error=QueueTimedOut(f"waited more than {self.config.queue_timeout_s:g} s for a slot"))))
        self.stats["preemptions"] += len(out.preempted)
        if out.chunks or out.kv_clears:
            sampled = self._runner.run(out)
            self.stats["steps"] += 1
            self.stats["max_running"] = max(self.stats["max_running"], sched.num_running)
            pieces = self._pieces
            for seq in sched.update_from_output(out, sampled, self._eog):
                live = self._live[seq.seq_id]
                text = live.text.push(pieces[seq.output_tokens[-1]])
                if live.text.stopped and not seq.is_finished:
                    sched.finish(seq, SequenceStatus.FINISHED_STOPPED)
                if seq.is_finished:
                    text += live.text.finish()
                if text:
                    batch.append((live.channel, Delta(text)))
                if seq.is_finished:
                    self._complete(live, batch)
        self._snapshot = {"running": sched.num_running, "waiting": sched.num_waiting, "kv_used": sched.kv_used}
        return None

    def _complete(self, live: _Live, batch: Batch) -> None:
        seq = live.seq
        del self._live[seq.seq_id]
        self._runner.release(seq)
        completion = len(seq.output_tokens)
        stats = self.stats
        stats["requests"] += 1
        stats["prompt_tokens"] += seq.num_prompt_tokens
        stats["cached_tokens"] += seq.num_cached
        stats["completion_tokens"] += completion
        self._record_duration(self._clock() - seq.arrival)
        batch.append((live.channel, Final(
            FINISH_REASON.get(seq.status),
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=completion,
            cached_tokens=seq.num_cached,
        )))

    def _fail(self, batch: Batch, exc: Exception) -> None:
        """A decode failed: end every running sequence with an error and wipe their slots."""
        sched = self._scheduler
        for seq in list(sched.running):
            slot = seq.slot
            sched.finish(seq, SequenceStatus.FINISHED_ERROR)
            if slot is not None:
                self._runner.clear_slot(slot)
                sched.reset_slot(slot)
            live = self._live.pop(seq.seq_id, None)
            self._runner.release(seq)
            if live is not None:
                batch.append((live.channel, Final(None, error=EngineFailure(f"engine error: {type(exc).__name__}"))))

    def _entry_channel(self, entry: _Live) -> Channel:
        return entry.channel

    def _open_channels(self) -> list[Channel]:
        channels = [live.channel for live in self._live.values()]
        self._live.clear()
        return channels

    def _reset(self) -> None:
        old, self._scheduler = self._scheduler, Scheduler(self.config)
        for seq in [*old.running, *old.waiting]:
            self._runner.release(seq)
        for slot in range(self.config.num_slots):
            self._runner.clear_slot(slot)

    def _close(self) -> None:
        self._runner.close()
