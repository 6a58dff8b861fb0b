"""The local-model client: an async API over the loaded engines, with no HTTP in it.

The routes (``server.local``), the workloads (``server.workloads``) and anything that races the
cloud call this, on the event-loop thread. Each call submits to the engine thread that owns the
model and awaits its results; cancelling the awaiting task (a client that disconnected, a race
that was lost) aborts the request in the engine, which frees its slot at its next step.

Errors are this package's own (no HTTP status here; ``server.local`` maps them):
- ``UnknownModel``, ``WrongKind``, ``ModelNotReady`` from ``lookup``;
- the engines' ``EngineOverloaded`` / ``EngineStopped`` at submit time, and ``QueueTimedOut``,
  ``InputTooLong``, ``EngineFailure`` when the request fails in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.bridge import Channel, Delta, Final
from models.catalog import ModelKind
from models.priority import Priority
from models.registry import ModelEntry, ModelRegistry, ModelState
from models.sequence import SamplingParams


class ModelLookupError(Exception):
    def __init__(self, model_id: str, message: str) -> None:
        super().__init__(message)
        self.model_id = model_id


class UnknownModel(ModelLookupError):
    pass


class WrongKind(ModelLookupError):
    def __init__(self, model_id: str, kind: ModelKind) -> None:
        super().__init__(model_id, f"model '{model_id}' is a {kind.value} model")
        self.kind = kind


class ModelNotReady(ModelLookupError):
    def __init__(self, model_id: str, message: str, final: bool) -> None:
        super().__init__(model_id, message)
        self.final = final
        """True when the model will not become ready without a restart (missing, corrupt)."""


@dataclass(frozen=True)
class Load:
    """What a local model's engine is doing now: an LLM's slots and running requests, and what
    waits for it (requests for an LLM, inputs for an embedding model). A classifier reports its
    embedding model's queue, where its work waits."""

    slots: int = 0
    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    kv_capacity: int = 0
    """KV cache cells in use and in all (LLMs; 0 for the others)."""


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray
    tokens: int


async def drain(channel: Channel) -> Final:
    """Await a request's ``Final`` (ignoring deltas); cancels the request if the awaiting task is
    cancelled; raises the engine's error."""
    try:
        while True:
            for item in await channel.get():
                if isinstance(item, Final):
                    if item.error is not None:
                        raise item.error
                    return item
    finally:
        channel.cancel()


class LocalClient:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def lookup(self, model_id: str, *kinds: ModelKind) -> ModelEntry:
        entry = self.registry.get(model_id)
        if entry is None:
            raise UnknownModel(model_id, f"no model '{model_id}'")
        if kinds and entry.spec.kind not in kinds:
            raise WrongKind(model_id, entry.spec.kind)
        if entry.state is not ModelState.READY:
            why = entry.reason or f"it is {entry.state.value}"
            raise ModelNotReady(model_id, f"the model '{model_id}' is not available: {why}", entry.state.is_final)
        return entry

    def load(self, model_id: str) -> Load | None:
        """The engine's current load (None: no such model, or not loaded). Any caller on the loop;
        the figures may be one engine step stale."""
        entry = self.registry.get(model_id)
        if entry is not None and entry.spec.classifier is not None:
            entry = self.registry.get(entry.spec.classifier.embedding_model)
        engine = entry.engine if entry is not None else None
        if engine is None:
            return None
        status = engine.status()
        return Load(int(status.get("slots") or 0), int(status.get("running") or 0),
                    int(status.get("waiting", status.get("queued_inputs")) or 0),
                    int(status.get("kv_used") or 0), int(status.get("kv_capacity") or 0))

    # -- generation ------------------------------------------------------------------------------
    def submit(self, entry: ModelEntry, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams,
               stop: tuple[str, ...] = (), priority: int = Priority.NORMAL) -> Channel:
        """Queue a generation; the caller reads the channel (``Delta`` items, then one ``Final``)."""
        return entry.engine.submit(prompt_tokens, max_tokens, sampling, stop, priority)

    async def generate(self, model_id: str, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams,
                       stop: tuple[str, ...] = (), priority: int = Priority.NORMAL) -> AsyncIterator[Delta | Final]:
        """Yields ``Delta`` items then the ``Final``; closing the iterator aborts the request."""
        channel = self.submit(self.lookup(model_id, ModelKind.CHAT), prompt_tokens, max_tokens, sampling, stop, priority)
        try:
            while True:
                for item in await channel.get():
                    if isinstance(item, Final) and item.error is not None:
                        raise item.error
                    yield item
                    if isinstance(item, Final):
                        return
        finally:
            channel.cancel()

    # -- embeddings and classification -----------------------------------------------------------
    async def embed(self, model_id: str, texts: list[str], priority: int = Priority.NORMAL) -> Embeddings:
        entry = self.lookup(model_id, ModelKind.EMBEDDING)
        final = await drain(entry.engine.submit(texts, priority))
        return Embeddings(final.payload, final.prompt_tokens)

    async def classify(self, model_id: str, texts: list[str], priority: int = Priority.NORMAL) -> Any:
        """``models.classifier.Classified``: one ``Classification`` per text, and the tokens read."""
        entry = self.lookup(model_id, ModelKind.CLASSIFIER)
        return await entry.engine.classify(texts, priority)
