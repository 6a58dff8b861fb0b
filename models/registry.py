"""The loaded models: one ``ModelEntry`` per catalog entry, with its lifecycle state and engine.

Lifecycle (one enum, ``ModelState``)::

    PENDING → VERIFYING → LOADING → READY
                 │           └────→ FAILED       (llama.cpp / onnxruntime refused the file)
                 └────────────────→ UNAVAILABLE  (file missing, sha256 mismatch, does not fit)

``load_all()`` runs once, off the event loop (``server.app`` starts it in a thread), and never
raises for one bad model: the entry says why, one log line names the file and the expected hash,
and the other models load and serve. ``get()`` and ``entries`` are read from the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardware.detect import HardwareInfo
from hardware.plan import ModelPlan, Plan
from hardware.tuning import ModelDoesNotFit
from models.catalog import ModelFormat, ModelKind, ModelSpec
from models.integrity import verify

log = logging.getLogger("understudy.models")


class DependencyUnavailable(Exception):
    """A model this one is built on (a classifier's embedding model) is not available."""


class ModelState(str, enum.Enum):
    PENDING = "pending"
    VERIFYING = "verifying"
    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (ModelState.READY, ModelState.UNAVAILABLE, ModelState.FAILED)


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.PENDING
    reason: str = ""
    engine: Any = None
    """``LlmEngine`` (chat) or ``EmbedEngine`` (embedding) once READY."""
    llm: Any = None
    """``LlamaModel`` for chat models: tokenize / render the chat template on the event loop."""
    context_length: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    load_seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.spec.id,
            "kind": self.spec.kind.value,
            "format": self.spec.format.value,
            "state": self.state.value,
            "source": self.spec.source,
            "path": str(self.spec.path) if self.spec.path else None,
            "sha256": self.spec.sha256,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.context_length:
            out["context_length"] = self.context_length
        if self.settings:
            out["settings"] = self.settings
        return out


class ModelRegistry:
    def __init__(self, specs: list[ModelSpec], hardware: HardwareInfo, cache_dir: Path | None = None) -> None:
        from models.sizing import load_order

        # Classifiers load last: they need their embedding model running.
        self._entries = {spec.id: ModelEntry(spec) for spec in load_order(specs)}
        self._hw = hardware
        self.plan: Plan | None = None
        """Set by ``server.app`` before ``load_all`` (else made there); read-only afterwards."""
        self._cache_dir = cache_dir or Path(".understudy") / "classifiers"
        self._done = threading.Event()

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    @property
    def loading_done(self) -> bool:
        return self._done.is_set()

    def load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self.plan is None:
                from models.capabilities import engine_caps
                from models.sizing import plan_for

                self.plan = plan_for([e.spec for e in self._entries.values()], self._hw, engine_caps())
            for entry in self._entries.values():
                self._load(entry, loop)
            self._check_openmp_threads()
        finally:
            self._done.set()

    def _check_openmp_threads(self) -> None:
        """llama.cpp's CPU kernels synchronise through libgomp barriers, and libgomp keeps one
        pool per engine thread for the life of the process, idle or not. When the GGUF engines'
        threads add up to more than the cores, libgomp counts more threads than CPUs and stops
        spinning at its barriers: every model decodes 30-50 % slower, even while the others are
        idle (measured with a second, idle SmolLM2 engine on 2 cores). Said once, at start."""
        threads = {e.id: e.settings["threads"] for e in self._entries.values()
                   if e.spec.kind is ModelKind.CHAT and e.state is ModelState.READY and e.settings.get("threads", 1) > 1}
        cores = self._hw.usable_cores
        if len(threads) > 1 and sum(threads.values()) > cores:
            log.warning("the GGUF models' compute threads (%s) add up to more than the %d usable cores: libgomp then "
                        "stops spinning at its barriers and every model decodes 30-50%% slower, even while the others "
                        "are idle; give each model fewer `threads` so that they add up to %d at most",
                        ", ".join(f"{k}: {v}" for k, v in threads.items()), cores, cores)

    def close(self) -> None:
        for entry in self._entries.values():
            if entry.engine is not None:
                entry.engine.stop()
                entry.engine = None
            if entry.llm is not None:
                entry.llm.close()
                entry.llm = None

    # -- loading thread --------------------------------------------------------------------------
    def _load(self, entry: ModelEntry, loop: asyncio.AbstractEventLoop) -> None:
        spec = entry.spec
        started = time.monotonic()
        entry.state = ModelState.VERIFYING
        result = verify(spec)
        if not result.ok:
            self._refuse(entry, ModelState.UNAVAILABLE, result.message)
            return
        entry.state = ModelState.LOADING
        try:
            if spec.format is ModelFormat.GGUF:
                self._load_gguf(entry, loop)
            elif spec.format is ModelFormat.ONNX:
                self._load_onnx(entry, loop)
            else:
                self._load_classifier(entry, loop)
        except ModelDoesNotFit as exc:
            self._refuse(entry, ModelState.UNAVAILABLE, f"model '{spec.id}' ({spec.path}) does not fit: {exc}")
            return
        except DependencyUnavailable as exc:
            self._refuse(entry, ModelState.UNAVAILABLE, f"model '{spec.id}' cannot load: {exc}")
            return
        except Exception as exc:
            log.debug("load failure", exc_info=True)
            self._refuse(entry, ModelState.FAILED, f"model '{spec.id}' ({spec.path}) failed to load: {exc}")
            return
        entry.load_seconds = time.monotonic() - started
        entry.state = ModelState.READY
        log.info("model %s ready in %.2f s (%s)", spec.id, entry.load_seconds,
                 ", ".join(f"{k}={v}" for k, v in entry.settings.items()))

    def _refuse(self, entry: ModelEntry, state: ModelState, message: str) -> None:
        entry.state = state
        entry.reason = message
        log.error("%s; the model is unavailable, the others still serve", message)

    def _planned(self, entry: ModelEntry) -> ModelPlan:
        """This model's part of the box's plan (``hardware.plan``); refused -> ``ModelDoesNotFit``."""
        planned = self.plan.get(entry.id) if self.plan is not None else None
        if planned is None or planned.device == "-" and not planned.refused:
            why = planned.reasons.get("model", "") if planned is not None else "it is not in the plan"
            raise ModelDoesNotFit(f"it could not be planned: {why}")
        if planned.refused:
            raise ModelDoesNotFit(planned.refused)
        return planned

    def _load_gguf(self, entry: ModelEntry, loop: asyncio.AbstractEventLoop) -> None:
        from models.llama_runner import LlamaModel, LlamaRunner
        from models.llm_engine import LlmEngine
        from models.scheduler import SchedulerConfig

        spec, opts = entry.spec, entry.spec.options
        assert spec.path is not None
        tuning = self._planned(entry).llm
        assert tuning is not None
        model = None
        try:
            model = LlamaModel(spec.path, gpu_layers=tuning.gpu_layers)
            runner = LlamaRunner(
                model, num_slots=tuning.slots, kv_tokens=tuning.kv_tokens, batch_tokens=tuning.batch_tokens,
                threads=tuning.threads, kv_unified=opts.kv_unified,
            )
        except BaseException:
            if model is not None:
                model.close()
            raise
        config = SchedulerConfig(
            num_slots=tuning.slots,
            max_batch_tokens=tuning.batch_tokens,
            kv_capacity=runner.kv_capacity,
            kv_per_slot=not opts.kv_unified,
            queue_timeout_s=opts.queue_timeout_s,
        )
        engine = LlmEngine(spec.id, runner, config, model.pieces, model.eog, tuning.max_waiting)
        engine.start(loop)
        try:
            engine.wait_started()  # the warm-up decode runs on the engine thread (LlamaRunner.warm_up)
        except BaseException:
            engine.stop()
            runner.close()
            model.close()
            raise
        entry.llm = model
        entry.engine = engine
        entry.context_length = min(tuning.max_context, config.max_seq_tokens)
        entry.settings = {
            "threads": tuning.threads, "gpu_layers": tuning.gpu_layers, "slots": tuning.slots,
            "kv_tokens": runner.kv_capacity, "kv_unified": opts.kv_unified, "batch_tokens": tuning.batch_tokens,
            "max_waiting": tuning.max_waiting, "queue_timeout_s": opts.queue_timeout_s,
            "estimated_mib": tuning.estimated_bytes // (1024 * 1024),
        }

    def _load_onnx(self, entry: ModelEntry, loop: asyncio.AbstractEventLoop) -> None:
        from models.embed_engine import EmbedEngine
        from models.onnx_runner import OnnxEmbedder

        spec, opts = entry.spec, entry.spec.options
        assert spec.path is not None and spec.tokenizer_path is not None
        max_length = spec.context_length or 512
        tuning = self._planned(entry).embedding
        assert tuning is not None
        embedder = OnnxEmbedder(spec.path, spec.tokenizer_path, tuning.threads, max_length, provider=tuning.provider)
        engine = EmbedEngine(
            spec.id, embedder, tuning.max_batch_requests, tuning.max_batch_tokens, tuning.max_waiting,
            max_wait_s=opts.batch_wait_ms / 1000.0, queue_timeout_s=opts.queue_timeout_s,
            fill_wait_s=opts.batch_fill_wait_ms / 1000.0,
        )
        engine.start(loop)
        entry.engine = engine
        entry.context_length = max_length
        entry.settings = {
            "threads": tuning.threads, "max_batch_requests": tuning.max_batch_requests,
            "max_batch_tokens": tuning.max_batch_tokens, "max_waiting": tuning.max_waiting,
            "batch_wait_ms": opts.batch_wait_ms, "batch_fill_wait_ms": opts.batch_fill_wait_ms,
            "queue_timeout_s": opts.queue_timeout_s, "dimensions": embedder.dimensions, "provider": tuning.provider,
        }


    def _load_classifier(self, entry: ModelEntry, loop: asyncio.AbstractEventLoop) -> None:
        from models.classifier_loader import load_classifier

        spec = entry.spec
        assert spec.classifier is not None
        base = self._entries.get(spec.classifier.embedding_model)
        if base is None or base.state is not ModelState.READY:
            why = base.reason if base is not None and base.reason else "not loaded"
            raise DependencyUnavailable(f"its embedding model '{spec.classifier.embedding_model}' is unavailable ({why})")
        classifier, settings = load_classifier(spec, base.spec, base.engine, self._cache_dir, loop)
        entry.engine = classifier
        entry.settings = settings
