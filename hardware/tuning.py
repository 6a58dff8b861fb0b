"""Derive engine settings from the detected hardware.

Called by ``models.registry`` before a model is loaded. Pure arithmetic on ``HardwareInfo`` and a
few numbers read from the model file; every value can be overridden from the config (an explicit
value is never silently changed: if it does not fit, the model is refused).

Defaults (documented in the README, "Tuning"):
- threads: ``HardwareInfo.usable_cores`` (physical cores, capped by affinity and cgroup quota).
- GPU offload: every layer when the build supports offload and model + KV cache fit in 90 % of the
  first GPU's free memory, else none.
- slots (sequences decoded together): 4 per usable core, between 4 and 16 on CPU; 32 on a GPU.
- KV cache (``n_ctx``): 4096 tokens per slot (or the model's training context if smaller), halved
  until the model, the cache and a compute reserve fit in usable memory (never below 512 per slot;
  below that the model is refused with the numbers).
- per-request context: the model's training context, capped by what one slot holds (the engine
  derives it from the cache layout, see ``models.scheduler``).
- step token budget (``n_batch``): 512. Waiting queue: 4 requests per slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from hardware.detect import HardwareInfo

MIB = 1024 * 1024
_COMPUTE_RESERVE_BYTES = 96 * MIB
_MIN_TOKENS_PER_SLOT = 512
_DEFAULT_TOKENS_PER_SLOT = 4096


class ModelDoesNotFit(Exception):
    """The model and its KV cache cannot fit in the memory this machine has left."""


@dataclass(frozen=True)
class LlmShape:
    """What tuning needs to know about a GGUF model (read from its metadata)."""

    file_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int

    @property
    def kv_bytes_per_token(self) -> int:
        head_dim = self.n_embd // max(1, self.n_head)
        return 2 * self.n_layer * self.n_head_kv * head_dim * 2  # K and V, f16


@dataclass(frozen=True)
class LlmOverrides:
    threads: int | None = None
    gpu_layers: int | None = None
    slots: int | None = None
    kv_tokens: int | None = None
    batch_tokens: int | None = None
    max_waiting: int | None = None


@dataclass(frozen=True)
class LlmTuning:
    threads: int
    gpu_layers: int
    slots: int
    kv_tokens: int
    max_context: int
    batch_tokens: int
    max_waiting: int
    estimated_bytes: int


@dataclass(frozen=True)
class EmbeddingTuning:
    threads: int
    max_batch_requests: int
    max_batch_tokens: int
    max_waiting: int


def _estimate(shape: LlmShape, kv_tokens: int) -> int:
    return shape.file_bytes + kv_tokens * shape.kv_bytes_per_token + _COMPUTE_RESERVE_BYTES


def tune_llm(
    hw: HardwareInfo,
    shape: LlmShape,
    overrides: LlmOverrides = LlmOverrides(),
    gpu_offload_supported: bool = False,
) -> LlmTuning:
    """Pick settings for one GGUF model; raises ``ModelDoesNotFit`` with the figures when it cannot."""
    gpu = hw.gpu.gpus[0] if hw.gpu.gpus else None
    on_gpu = gpu is not None and gpu_offload_supported and overrides.gpu_layers != 0
    if overrides.gpu_layers and not on_gpu:
        why = "no NVIDIA GPU was detected" if gpu is None else "this llama.cpp build has no GPU offload"
        raise ModelDoesNotFit(f"gpu_layers = {overrides.gpu_layers} was asked for but {why}; remove it to run on the CPU")
    slots = overrides.slots or (32 if on_gpu else min(16, max(4, 4 * hw.usable_cores)))
    if overrides.kv_tokens is not None:
        kv_tokens = overrides.kv_tokens
    else:
        kv_tokens = slots * max(_MIN_TOKENS_PER_SLOT, min(shape.n_ctx_train, _DEFAULT_TOKENS_PER_SLOT))
    need = _estimate(shape, kv_tokens)
    if on_gpu:
        assert gpu is not None
        gpu_room = int(gpu.memory_free_bytes * 0.9)
        host_room = hw.usable_memory_bytes
        if overrides.kv_tokens is None:
            while need > gpu_room and kv_tokens // 2 >= slots * _MIN_TOKENS_PER_SLOT:
                kv_tokens //= 2
                need = _estimate(shape, kv_tokens)
        if need <= gpu_room:
            gpu_layers = overrides.gpu_layers if overrides.gpu_layers is not None else shape.n_layer + 1
        elif overrides.gpu_layers:
            raise ModelDoesNotFit(f"gpu_layers = {overrides.gpu_layers} was asked for but the model and its KV cache "
                                  f"need about {need // MIB} MiB and the GPU has {gpu_room // MIB} MiB free")
        else:
            gpu_layers = 0
        room = gpu_room if gpu_layers else host_room
    else:
        gpu_layers = 0
        room = hw.usable_memory_bytes
        if overrides.kv_tokens is None:
            while need > room and kv_tokens // 2 >= slots * _MIN_TOKENS_PER_SLOT:
                kv_tokens //= 2
                need = _estimate(shape, kv_tokens)
    if need > room:
        raise ModelDoesNotFit(
            f"needs about {need // MIB} MiB (weights {shape.file_bytes // MIB} MiB + KV cache for "
            f"{kv_tokens} tokens {kv_tokens * shape.kv_bytes_per_token // MIB} MiB + "
            f"{_COMPUTE_RESERVE_BYTES // MIB} MiB compute) but only {room // MIB} MiB is available"
        )
    max_context = min(shape.n_ctx_train, kv_tokens)
    return LlmTuning(
        threads=overrides.threads or hw.usable_cores,
        gpu_layers=gpu_layers,
        slots=slots,
        kv_tokens=kv_tokens,
        max_context=max_context,
        batch_tokens=overrides.batch_tokens or 512,
        max_waiting=overrides.max_waiting if overrides.max_waiting is not None else 4 * slots,
        estimated_bytes=need,
    )


def tune_embedding(
    hw: HardwareInfo,
    max_tokens_per_input: int,
    threads: int | None = None,
    max_batch_requests: int | None = None,
    max_batch_tokens: int | None = None,
    max_waiting: int | None = None,
) -> EmbeddingTuning:
    """Settings for one ONNX embedding model: batches of up to 32 inputs (the engine's plateau on CPU)."""
    batch = max_batch_requests or 32
    return EmbeddingTuning(
        threads=threads or hw.usable_cores,
        max_batch_requests=batch,
        max_batch_tokens=max_batch_tokens or batch * max_tokens_per_input,
        max_waiting=max_waiting if max_waiting is not None else 8192,
    )
