"""Which local model answers a workload request, and how: pure functions of the configuration
and the catalog (no I/O), called by ``server.routing.Router`` on the event-loop thread.

- ``local_answer``: a ``LocalAnswer`` (who answers, why, the queue class, the visible notice).
- ``triage_model``: the classifier for ``/v1/triage``.
- ``summary_plan`` / ``summarize_target``: the method and models of a summary.
Errors are ``InvalidRequest`` naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

from models.catalog import MINILM_ID, ModelKind
from models.priority import Priority
from models.registry import ModelRegistry
from server.config import WorkloadConfig
from server.errors import InvalidRequest
from server.local import LocalAnswer
from server.workloads.summaries import Plan


def kind_of(registry: ModelRegistry, model_id: str | None) -> ModelKind | None:
    entry = registry.get(model_id) if model_id else None
    return entry.spec.kind if entry is not None else None


def local_answer(wl: WorkloadConfig | None, model: str, reason: str | None, free_text: bool = True) -> LocalAnswer:
    """A request that names a model directly is ``normal`` and gets no notice."""
    if wl is None:
        return LocalAnswer(model, reason)
    return LocalAnswer(model, reason, Priority.from_name(wl.priority), wl.local_notice if free_text else None)


def triage_model(model: str | None, workloads: Mapping[str, WorkloadConfig], by_model: Mapping[str, WorkloadConfig],
                 registry: ModelRegistry) -> tuple[str, WorkloadConfig | None]:
    """``/v1/triage``'s model: a classifier id, or a workload served by a classifier, or (none
    given) the ``triage`` workload's classifier, else the first classifier of the catalog."""
    if model is None:
        wl = workloads.get("triage")
        if wl is not None and wl.local_model and kind_of(registry, wl.local_model) is ModelKind.CLASSIFIER:
            return wl.local_model, wl
        first = next((e.id for e in registry.entries if e.spec.kind is ModelKind.CLASSIFIER), None)
        if first is None:
            raise InvalidRequest("No classifier is configured; name one with 'model'.", param="model")
        return first, None
    wl = by_model.get(model)
    if wl is None:
        return model, None
    if not wl.local_model or kind_of(registry, wl.local_model) is not ModelKind.CLASSIFIER:
        raise InvalidRequest(f"The workload '{wl.name}' is not served by a classifier.", param="model", code="model_not_supported")
    return wl.local_model, wl


def summary_plan(wl: WorkloadConfig, method: str | None, max_words: int | None, reason: str | None,
                 registry: ModelRegistry) -> Plan:
    """A summaries workload's plan; ``method`` / ``max_words`` from the request override its own."""
    assert wl.embedding_model is not None and wl.summary_method is not None
    chat = wl.local_model if kind_of(registry, wl.local_model) is ModelKind.CHAT else None
    method = method or wl.summary_method
    if method == "abstractive" and chat is None:
        raise InvalidRequest(f"The workload '{wl.name}' has no local chat model for abstractive summaries.", param="method")
    model = chat if method == "abstractive" and chat else wl.embedding_model
    return Plan(method, wl.embedding_model, chat, max_words or wl.max_words, local_answer(wl, model, reason))


def summarize_target(model: str | None, method: str | None, max_words: int | None, workloads: Mapping[str, WorkloadConfig],
                     by_model: Mapping[str, WorkloadConfig], registry: ModelRegistry) -> tuple[Plan, WorkloadConfig | None]:
    """``/v1/summarize``'s plan. Its model is a summaries workload (default: ``summaries``), or a
    chat model (abstractive, checked with the summaries workload's embedding model), or an
    embedding model (extractive). A model id of another kind raises ``LookupError``."""
    wl = workloads.get("summaries") if model is None else by_model.get(model)
    if wl is not None and wl.summary_method is not None:
        return summary_plan(wl, method, max_words, None, registry), wl
    if model is None:
        raise InvalidRequest("No summaries workload is configured; name a model with 'model'.", param="model")
    default = workloads.get("summaries")
    embedding = default.embedding_model if default is not None and default.embedding_model else MINILM_ID
    kind = kind_of(registry, model)
    if kind is ModelKind.CHAT:
        stand_in = WorkloadConfig(name=model, local_model=model, summary_method="abstractive", embedding_model=embedding)
    elif kind is ModelKind.EMBEDDING:
        stand_in = WorkloadConfig(name=model, local_model=model, summary_method="extractive", embedding_model=model)
    else:
        raise LookupError(model)
    if kind_of(registry, stand_in.embedding_model) is not ModelKind.EMBEDDING:
        raise InvalidRequest("No embedding model is available to pick or check summary sentences.", param="model")
    # A stand-in workload with the defaults: normal priority, no notice.
    return summary_plan(stand_in, method, max_words, None, registry), None
