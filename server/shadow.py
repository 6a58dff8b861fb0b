"""Shadow mode: while the cloud answers, measure how the local stand-in would have answered.

For a covered workload with ``shadow_rate`` > 0, that share of its cloud answers is also answered
locally, *after* the cloud answer has been sent (the router hands the finished cloud text to
``Shadow.submit``; nothing here runs before the client has its answer), at the lowest queue class
(``Priority.BACKGROUND``). When the local model is busy with real traffic, the shadow request is
skipped and counted as skipped.

What is compared (numbers only; never the prompt or either answer):
- a classifier workload (triage): the cloud's label, parsed from the JSON the workload's
  ``cloud_system_prompt`` asks for, against the local label; a cloud answer that does not parse
  (or names no known label) is ``unparseable``, not a disagreement;
- a summaries workload: the cosine between the embeddings of the two summaries, and the share
  of the local summary's sentences found in the source (``supported``).

Each comparison is a ``shadow`` row in the journal and joins a per-workload sliding window read
by ``GET /admin/readiness`` (``readiness()``). All on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models.priority import Priority
from server.config import WorkloadConfig
from server.events import EventBus
from server.local import LocalModels

log = logging.getLogger("understudy.shadow")

#: Readiness is reported over the last day of shadow comparisons (at most this many per workload).
WINDOW_S = 24 * 3600.0
MAX_SAMPLES = 5000


@dataclass(frozen=True)
class Sample:
    at: float
    outcome: str  # agree, disagree, unparseable, compared (summaries), skipped, failed
    cloud_label: str | None = None
    local_label: str | None = None
    cosine: float | None = None
    supported: float | None = None


def user_text(body: dict[str, Any]) -> str | None:
    """The last user message of a chat request body (text parts joined), or None."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content or None
            if isinstance(content, list):
                text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
                return text or None
            return None
    return None


def answer_text(body: bytes) -> str | None:
    """The content of a non-streamed chat answer, or None."""
    try:
        return json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def delta_text(event: bytes) -> str:
    """The content carried by one SSE event of a chat stream ("" if none)."""
    out = []
    for line in event.splitlines():
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            try:
                payload = json.loads(line[5:])
                out.append(payload["choices"][0]["delta"].get("content") or "")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
    return "".join(out)


def cloud_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label in a cloud answer that should be the template's JSON (``{"label": ...}``), or
    None when it does not parse or names no known label. A JSON object inside prose counts."""
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except ValueError:
        return None
    label = value.get("label") if isinstance(value, dict) else None
    return label if isinstance(label, str) and label in labels else None


class Shadow:
    def __init__(self, local: LocalModels, summaries: Any, events: EventBus | None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.local = local
        self.summaries = summaries
        self.events = events
        self._clock = clock
        self._rng = rng or random.Random()
        self._samples: dict[str, deque[Sample]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- router side -----------------------------------------------------------------------------
    def wanted(self, wl: WorkloadConfig | None) -> bool:
        """Draw whether this cloud request is shadowed (called once per covered cloud request)."""
        return wl is not None and wl.shadow_rate > 0 and self._rng.random() < wl.shadow_rate

    def submit(self, wl: WorkloadConfig, user_text: str, cloud_text: str) -> None:
        """After the cloud answer was sent: compare in the background (never awaited by a request)."""
        if self._busy(wl):
            self._record(wl, Sample(self._clock(), "skipped"))
            return
        task = asyncio.create_task(self._compare(wl, user_text, cloud_text), name=f"shadow-{wl.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def after_answer(self, wl: WorkloadConfig, user_text: str, cloud_text: str) -> None:
        """``submit`` as a Starlette background task (async, so it runs on the loop, not a thread)."""
        self.submit(wl, user_text, cloud_text)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- comparison ------------------------------------------------------------------------------
    def _busy(self, wl: WorkloadConfig) -> bool:
        """Real traffic comes first: skip when anything waits for the local model, or when an LLM
        has more than half its slots running."""
        load = self.local.client.load(wl.local_model or "")
        return load is None or load.waiting > 0 or (load.slots > 0 and load.running * 2 > load.slots)

    async def _compare(self, wl: WorkloadConfig, user_text: str, cloud_text: str) -> None:
        try:
            if wl.summary_method is not None:
                sample = await self._summaries(wl, user_text, cloud_text)
            else:
                sample = await self._classify(wl, user_text, cloud_text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the local side refused (overloaded, input too long...): counted, not raised
            log.info("shadow comparison for %s failed: %s", wl.name, type(exc).__name__)
            sample = Sample(self._clock(), "failed")
        self._record(wl, sample)

    async def _classify(self, wl: WorkloadConfig, user_text: str, cloud_text: str) -> Sample:
        model = wl.local_model or ""
        out = await self.local.client.classify(model, [user_text], Priority.BACKGROUND)
        decision = out.results[0]
        local = "needs_human_review" if decision.abstained else decision.label
        labels = tuple(self.local.registry.get(model).spec.classifier.labels)  # type: ignore[union-attr]
        cloud = cloud_label(cloud_text, labels)
        if cloud is None:
            return Sample(self._clock(), "unparseable", None, local)
        return Sample(self._clock(), "agree" if cloud == local else "disagree", cloud, local)

    async def _summaries(self, wl: WorkloadConfig, user_text: str, cloud_text: str) -> Sample:
        from server.workloads.choose import summary_plan
        from server.workloads.summaries import Io

        plan = summary_plan(wl, None, None, None, self.local.registry)
        plan = replace(plan, answer=replace(plan.answer, priority=Priority.BACKGROUND))
        summary = await self.summaries.summarize(user_text, plan, Io(None))
        sentences = summary.sentences
        supported = sum(1 for _, span in sentences if span is not None) / len(sentences) if sentences else 0.0
        vectors = (await self.local.client.embed(plan.embedding_model, [cloud_text, summary.text], Priority.BACKGROUND)).vectors
        a, b = np.asarray(vectors[0], dtype=np.float64), np.asarray(vectors[1], dtype=np.float64)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
        return Sample(self._clock(), "compared", cosine=round(cosine, 4), supported=round(supported, 4))

    def _record(self, wl: WorkloadConfig, sample: Sample) -> None:
        window = self._samples.setdefault(wl.name, deque(maxlen=MAX_SAMPLES))
        window.append(sample)
        if self.events is not None:
            numbers = {k: v for k, v in (("cloud_label", sample.cloud_label), ("local_label", sample.local_label),
                                         ("cosine", sample.cosine), ("supported", sample.supported)) if v is not None}
            self.events.record_shadow(wl.name, wl.local_model, sample.outcome, json.dumps(numbers, separators=(",", ":")))

    # -- readiness -------------------------------------------------------------------------------
    def readiness(self, workloads: list[WorkloadConfig]) -> dict[str, Any]:
        """Per shadowed workload over the last day: samples, skipped, and the local readiness
        (triage: the share of parseable cloud answers the local label agreed with; summaries: the
        mean cosine), with the confusion matrix or the mean supported share."""
        now = self._clock()
        out: dict[str, Any] = {}
        for wl in workloads:
            if wl.shadow_rate <= 0:
                continue
            window = self._samples.get(wl.name, deque())
            recent = [s for s in window if now - s.at <= WINDOW_S]
            counts: dict[str, int] = {}
            for s in recent:
                counts[s.outcome] = counts.get(s.outcome, 0) + 1
            entry: dict[str, Any] = {"shadow_rate": wl.shadow_rate, "window_s": WINDOW_S, "counts": counts}
            if wl.summary_method is not None:
                compared = [s for s in recent if s.outcome == "compared"]
                entry["samples"] = len(compared)
                entry["readiness"] = round(float(np.mean([s.cosine for s in compared])), 4) if compared else None
                entry["metric"] = "mean embedding cosine, local summary vs cloud summary"
                entry["supported"] = round(float(np.mean([s.supported for s in compared])), 4) if compared else None
            else:
                judged = [s for s in recent if s.outcome in ("agree", "disagree")]
                entry["samples"] = len(judged)
                entry["readiness"] = round(sum(s.outcome == "agree" for s in judged) / len(judged), 4) if judged else None
                entry["metric"] = "label agreement with the cloud (unparseable cloud answers excluded)"
                confusion: dict[str, dict[str, int]] = {}
                for s in judged:
                    row = confusion.setdefault(s.cloud_label or "?", {})
                    row[s.local_label or "?"] = row.get(s.local_label or "?", 0) + 1
                entry["confusion"] = confusion
            out[wl.name] = entry
        return out
