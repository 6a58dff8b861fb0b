"""From the catalog to the hardware plan: read each model file's size and shape, then plan.

``plan_for(specs, hardware, caps)`` is called once at server start (``server.app``'s lifespan, in
a worker thread, before the model loader starts; ``models.registry`` then applies the plan) and by
``understudy hardware --plan``. Reads GGUF headers (``models.gguf``, ~60 ms for SmolLM2) and file
sizes, nothing else. A file that is missing or unreadable is left out of the plan with the reason;
the registry's integrity check reports it properly when it loads.
"""

from __future__ import annotations

from hardware.detect import HardwareInfo
from hardware.fallbacks import EngineCaps
from hardware.plan import EmbeddingOverrides, ModelAsk, Plan, make_plan
from hardware.tuning import LlmOverrides
from models.catalog import ModelFormat, ModelKind, ModelSpec
from models.gguf import GgufError, llm_shape


def load_order(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Classifiers last: they run on an embedding model that must be loaded (and planned) first."""
    return sorted(specs, key=lambda s: s.kind is ModelKind.CLASSIFIER)


def ask_for(spec: ModelSpec) -> ModelAsk:
    opts = spec.options
    if spec.kind is ModelKind.CLASSIFIER:
        assert spec.classifier is not None
        return ModelAsk(spec.id, "classifier", depends_on=spec.classifier.embedding_model)
    if spec.path is None:
        return ModelAsk(spec.id, spec.kind.value, problem=spec.missing_hint or "its file is not installed")
    try:
        size = spec.path.stat().st_size
    except OSError as exc:
        return ModelAsk(spec.id, spec.kind.value, problem=f"{spec.path} cannot be read ({exc.strerror})")
    if spec.format is ModelFormat.GGUF:
        try:
            shape = llm_shape(spec.path)
        except (GgufError, OSError) as exc:
            return ModelAsk(spec.id, "chat", problem=str(exc))
        if spec.context_length:
            shape = type(shape)(**{**shape.__dict__, "n_ctx_train": spec.context_length})
        return ModelAsk(spec.id, "chat", shape=shape, file_bytes=size, llm=LlmOverrides(
            threads=opts.threads, gpu_layers=opts.gpu_layers, slots=opts.slots, kv_tokens=opts.kv_tokens,
            batch_tokens=opts.batch_tokens, max_waiting=opts.max_waiting))
    return ModelAsk(spec.id, "embedding", file_bytes=size, max_tokens_per_input=spec.context_length or 512,
                    embedding=EmbeddingOverrides(opts.threads, opts.max_batch_requests, opts.max_batch_tokens, opts.max_waiting))


def plan_for(specs: list[ModelSpec], hardware: HardwareInfo, caps: EngineCaps) -> Plan:
    return make_plan(hardware, caps, [ask_for(s) for s in load_order(specs)])
