"""The box's plan: every catalog model's engine settings, each with its reason, made once.

Pure (no files, no engines): ``make_plan(hardware, engine_caps, asks)`` places the models in
order (the registry's load order, classifiers last), each taking the RAM and GPU memory the ones
before it left, through ``hardware.tuning``. A model that cannot fit is refused with what it needs
against what is left; the others are still planned. Callers: ``models.sizing.plan_for`` (which
reads the model files into ``ModelAsk``s) at server start (``server.app``'s lifespan, before the
loader thread starts; the registry applies the plan) and ``understudy hardware --plan``.

``Plan.warnings`` says every way the plan falls back to the CPU while a GPU is there (a model
that does not fit, a partial offload): never a silent fallback (``hardware.fallbacks`` covers
the engines' builds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hardware.detect import HardwareInfo
from hardware.fallbacks import EngineCaps
from hardware.tuning import (
    GPU_MARGIN,
    GPU_RESERVE_BYTES,
    EmbeddingTuning,
    LlmOverrides,
    LlmShape,
    LlmTuning,
    ModelDoesNotFit,
    mib,
    tune_embedding,
    tune_llm,
)

_ONNX_OVERHEAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class EmbeddingOverrides:
    threads: int | None = None
    max_batch_requests: int | None = None
    max_batch_tokens: int | None = None
    max_waiting: int | None = None


@dataclass(frozen=True)
class ModelAsk:
    """One model to place: its kind, what its file says, and what the config fixed."""

    id: str
    kind: str
    """``chat``, ``embedding`` or ``classifier``."""
    shape: LlmShape | None = None
    file_bytes: int = 0
    max_tokens_per_input: int = 512
    llm: LlmOverrides = LlmOverrides()
    embedding: EmbeddingOverrides = EmbeddingOverrides()
    depends_on: str | None = None
    problem: str | None = None
    """Why the file could not be read (missing, not GGUF...): the model is left out of the plan."""


@dataclass(frozen=True)
class ModelPlan:
    id: str
    kind: str
    device: str
    """``cpu``, ``cuda:0``, ``cuda:0+cpu`` (partial offload), or ``-`` when not planned."""
    settings: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    refused: str | None = None
    host_bytes: int = 0
    gpu_bytes: int = 0
    llm: LlmTuning | None = None
    embedding: EmbeddingTuning | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": self.device, "settings": self.settings, "reasons": self.reasons,
                "refused": self.refused, "host_mib": self.host_bytes // 2**20, "gpu_mib": self.gpu_bytes // 2**20}


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelPlan, ...]
    warnings: tuple[str, ...]
    host_room_bytes: int
    gpu_room_bytes: int

    def get(self, model_id: str) -> ModelPlan | None:
        return next((m for m in self.models if m.id == model_id), None)

    def summary(self) -> str:
        """The one log line at start."""
        parts = []
        for m in self.models:
            if m.refused:
                parts.append(f"{m.id} refused")
            elif m.llm is not None:
                t = m.llm
                parts.append(f"{m.id} on {m.device} ({t.threads} threads, {t.slots} slots x {t.kv_tokens // t.slots} tokens"
                             + (f", {t.gpu_layers} GPU layers" if t.gpu_layers else "") + ")")
            elif m.embedding is not None:
                e = m.embedding
                parts.append(f"{m.id} on {m.device} ({e.threads} threads, batches of {e.max_batch_requests})")
            elif m.device != "-":
                parts.append(f"{m.id} on {m.device}")
        host = sum(m.host_bytes for m in self.models)
        gpu = sum(m.gpu_bytes for m in self.models)
        room = f"{mib(host)} of {mib(self.host_room_bytes)} RAM" + (f", {mib(gpu)} of {mib(self.gpu_room_bytes)} GPU" if gpu else "")
        return f"plan: {'; '.join(parts) or 'no model'}; {room}"

    def to_dict(self) -> dict[str, Any]:
        return {"models": {m.id: m.to_dict() for m in self.models}, "warnings": list(self.warnings),
                "host_room_mib": self.host_room_bytes // 2**20, "gpu_room_mib": self.gpu_room_bytes // 2**20,
                "summary": self.summary()}


def _llm_settings(t: LlmTuning) -> dict[str, Any]:
    return {"threads": t.threads, "batch_threads": t.threads, "gpu_layers": t.gpu_layers, "slots": t.slots,
            "kv_tokens": t.kv_tokens, "kv_tokens_per_slot": t.kv_tokens // t.slots, "max_context": t.max_context,
            "batch_tokens": t.batch_tokens, "max_waiting": t.max_waiting}


def _embedding_settings(t: EmbeddingTuning) -> dict[str, Any]:
    return {"threads": t.threads, "provider": t.provider, "max_batch_requests": t.max_batch_requests,
            "max_batch_tokens": t.max_batch_tokens, "max_waiting": t.max_waiting}


def make_plan(hw: HardwareInfo, caps: EngineCaps, asks: list[ModelAsk]) -> Plan:
    gpu = hw.gpu.gpus[0] if hw.gpu.gpus else None
    host_left = hw.usable_memory_bytes
    gpu_room = max(0, int(gpu.memory_free_bytes * GPU_MARGIN) - GPU_RESERVE_BYTES) if gpu else 0
    gpu_left = gpu_room
    chat_models = sum(1 for a in asks if a.kind == "chat" and a.problem is None)
    out: list[ModelPlan] = []
    warnings: list[str] = []
    for ask in asks:
        if ask.problem is not None:
            out.append(ModelPlan(ask.id, ask.kind, "-", refused=None, reasons={"model": f"not planned: {ask.problem}"}))
            continue
        if ask.kind == "chat":
            assert ask.shape is not None
            try:
                t = tune_llm(hw, ask.shape, ask.llm, caps.llama_gpu_offload, host_room=host_left,
                             gpu_room=gpu_left if gpu else None, chat_models=chat_models)
            except ModelDoesNotFit as exc:
                out.append(ModelPlan(ask.id, ask.kind, "-", refused=str(exc)))
                continue
            device = "cpu" if t.gpu_layers == 0 else ("cuda:0" if t.gpu_layers > ask.shape.n_layer else "cuda:0+cpu")
            host_left -= t.estimated_bytes
            gpu_left -= t.gpu_bytes
            out.append(ModelPlan(ask.id, ask.kind, device, _llm_settings(t), dict(t.reasons), None,
                                 t.estimated_bytes, t.gpu_bytes, llm=t))
            if gpu is not None and caps.llama_gpu_offload and device != "cuda:0" and ask.llm.gpu_layers != 0:
                warnings.append(f"{ask.id} {'runs partly' if device == 'cuda:0+cpu' else 'runs'} on the CPU although "
                                f"{gpu.name} is present: {t.reasons['gpu_layers']}")
        elif ask.kind == "embedding":
            o = ask.embedding
            e = tune_embedding(hw, ask.max_tokens_per_input, o.threads, o.max_batch_requests, o.max_batch_tokens,
                               o.max_waiting, caps.onnx_providers)
            need = 2 * ask.file_bytes + _ONNX_OVERHEAD_BYTES
            if need > host_left:
                out.append(ModelPlan(ask.id, ask.kind, "-", refused=f"needs about {mib(need)} but only {mib(max(0, host_left))} "
                                                                   "of RAM is left after the models before it"))
                continue
            host_left -= need
            device = "cuda:0" if e.provider == "CUDAExecutionProvider" else "cpu"
            on_gpu = need if device == "cuda:0" else 0  # onnxruntime's CUDA arena: weights and a batch's activations
            gpu_left -= on_gpu
            out.append(ModelPlan(ask.id, ask.kind, device, _embedding_settings(e), dict(e.reasons), None, need, on_gpu, embedding=e))
        else:
            base = next((m for m in out if m.id == ask.depends_on), None)
            if base is None or base.refused or base.device == "-":
                why = "is not in the catalog" if base is None else (base.refused or "is not planned")
                out.append(ModelPlan(ask.id, ask.kind, "-", refused=f"its embedding model {ask.depends_on!r} {why}"))
                continue
            out.append(ModelPlan(ask.id, ask.kind, f"{base.device} (on {base.id})",
                                 reasons={"engine": f"a calibrated head over {base.id}'s embeddings: it shares that engine, "
                                                    "its batches and its queue"}))
    return Plan(tuple(out), tuple(warnings), hw.usable_memory_bytes, gpu_room)
