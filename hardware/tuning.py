"""Settings for one model from the detected hardware, each with the reason it was chosen.

Called by ``hardware.plan.make_plan`` (the whole box's plan, which passes each model the memory the
models before it left). Pure arithmetic on ``HardwareInfo`` and a few numbers read from the model
file; every value can be overridden from the config, and an explicit value is never silently
changed: if it does not fit, the model is refused with the numbers.

Defaults (the README, "Sizing your box", shows them in a plan):
- threads (and batch threads, the same pool): ``HardwareInfo.usable_cores`` (physical cores,
  capped by affinity and cgroup quota), divided among the chat models when there are several
  (each llama.cpp engine keeps its own OpenMP pool; pools that add up to more than the cores
  make every decode 30-50 % slower).
- GPU offload, when a GPU is present and the llama.cpp build can offload: every layer when the
  weights, the KV cache and a compute reserve fit in 90 % of the GPU's free memory less 512 MiB
  (CUDA context and compute buffers), the KV cache halved first if that makes it fit; otherwise
  as many layers as fit (partial offload: the rest of the weights and their KV stay in RAM); else
  none.
- slots (sequences decoded together): 32 with every layer on a GPU; else 4 per usable core,
  between 4 and 16.
- KV cache (``kv_tokens``): 4096 tokens per slot (or the model's training context if smaller),
  halved until it fits (never below 512 per slot; below that the model is refused).
- step token budget (``batch_tokens``, llama.cpp's ``n_batch``/``n_ubatch``): 512; 2048 with every
  layer on a GPU. Waiting queue: 4 requests per slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hardware.detect import HardwareInfo

MIB = 1024 * 1024
GIB = 1024 * MIB
_COMPUTE_RESERVE_BYTES = 96 * MIB
GPU_RESERVE_BYTES = 512 * MIB
GPU_MARGIN = 0.9
_MIN_TOKENS_PER_SLOT = 512
_DEFAULT_TOKENS_PER_SLOT = 4096


class ModelDoesNotFit(Exception):
    """The model and its KV cache cannot fit in the memory this machine has left."""


@dataclass(frozen=True)
class LlmShape:
    """What tuning needs to know about a GGUF model (read from its metadata, ``models.gguf``)."""

    file_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    key_length: int | None = None
    """Per-head K and V sizes when the model states them (Qwen3: 128 while n_embd / n_head is 64)."""
    value_length: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        head_dim = self.n_embd // max(1, self.n_head)
        k, v = self.key_length or head_dim, self.value_length or self.key_length or head_dim
        return self.n_layer * self.n_head_kv * (k + v) * 2  # K and V, f16


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
    """Host RAM the model takes (weights and KV not offloaded, plus a compute reserve)."""
    gpu_bytes: int = 0
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingTuning:
    threads: int
    max_batch_requests: int
    max_batch_tokens: int
    max_waiting: int
    provider: str = "CPUExecutionProvider"
    reasons: dict[str, str] = field(default_factory=dict)


def mib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 10 * GIB else f"{n / MIB:.0f} MiB"


def cores_reason(hw: HardwareInfo) -> str:
    quota = hw.cgroup.cpu_quota_cores
    return (f"{hw.usable_cores} usable cores ({hw.cpu.physical_cores} physical, {hw.cpu.affinity_cores} allowed by "
            f"affinity, {'no cgroup CPU quota' if quota is None else f'cgroup quota {quota:g} CPUs'})")


def _kv_candidates(shape: LlmShape, slots: int, explicit: int | None) -> list[int]:
    if explicit is not None:
        return [explicit]
    kv = slots * max(_MIN_TOKENS_PER_SLOT, min(shape.n_ctx_train, _DEFAULT_TOKENS_PER_SLOT))
    out = [kv]
    while kv // 2 >= slots * _MIN_TOKENS_PER_SLOT:
        kv //= 2
        out.append(kv)
    return out


def _weights_and_kv(shape: LlmShape, kv_tokens: int) -> int:
    return shape.file_bytes + kv_tokens * shape.kv_bytes_per_token


def _kv_reason(shape: LlmShape, slots: int, kv: int, explicit: bool, room: str) -> str:
    if explicit:
        return "set in the config"
    full = max(_MIN_TOKENS_PER_SLOT, min(shape.n_ctx_train, _DEFAULT_TOKENS_PER_SLOT))
    per = kv // slots
    text = f"{per} tokens per slot x {slots} slots = {mib(kv * shape.kv_bytes_per_token)} of KV cache"
    return text if per >= full else f"{text} (halved from {full} per slot to fit {room})"


def _cpu_slots(hw: HardwareInfo) -> tuple[int, str]:
    slots = min(16, max(4, 4 * hw.usable_cores))
    return slots, f"4 per usable core between 4 and 16 ({hw.usable_cores} cores): CPU decode throughput stops growing past ~16 sequences"


def _threads(hw: HardwareInfo, overrides: LlmOverrides, share: int) -> tuple[int, str]:
    if overrides.threads:
        return overrides.threads, "set in the config"
    if share > 1:
        n = max(1, hw.usable_cores // share)
        return n, (f"{cores_reason(hw)} shared by {share} chat models: each engine keeps its own OpenMP pool, and "
                   "pools that add up to more than the cores slow every decode 30-50 %")
    return hw.usable_cores, cores_reason(hw)


def tune_llm(
    hw: HardwareInfo,
    shape: LlmShape,
    overrides: LlmOverrides = LlmOverrides(),
    gpu_offload_supported: bool = False,
    *,
    host_room: int | None = None,
    gpu_room: int | None = None,
    chat_models: int = 1,
) -> LlmTuning:
    """Pick settings for one GGUF model; raises ``ModelDoesNotFit`` with the figures when it cannot.

    ``host_room``/``gpu_room``: bytes left for this model (default: all the usable RAM, and 90 % of
    the first GPU's free memory less the reserve). ``chat_models``: how many chat models share the cores."""
    reasons: dict[str, str] = {}
    host_room = hw.usable_memory_bytes if host_room is None else host_room
    gpu = hw.gpu.gpus[0] if hw.gpu.gpus else None
    if gpu is not None and gpu_room is None:
        gpu_room = max(0, int(gpu.memory_free_bytes * GPU_MARGIN) - GPU_RESERVE_BYTES)
    want_gpu = gpu is not None and gpu_offload_supported and overrides.gpu_layers != 0
    if overrides.gpu_layers and not want_gpu:
        why = "no NVIDIA GPU was detected" if gpu is None else "this llama.cpp build has no GPU offload"
        raise ModelDoesNotFit(f"gpu_layers = {overrides.gpu_layers} was asked for but {why}; remove it to run on the CPU")
    threads, reasons["threads"] = _threads(hw, overrides, chat_models)
    reasons["batch_threads"] = "the same pool as threads (prompt processing and decoding share the cores)"
    explicit_kv = overrides.kv_tokens
    kv_why = "set in the config" if explicit_kv is not None else ""
    placed: tuple[int, int, int, int, int] | None = None  # gpu_layers, slots, kv_tokens, host bytes, gpu bytes

    if want_gpu:
        assert gpu is not None and gpu_room is not None
        free = f"{mib(gpu_room)} usable on {gpu.name} (90 % of {mib(gpu.memory_free_bytes)} free, less {mib(GPU_RESERVE_BYTES)} reserve)"
        full_ok = overrides.gpu_layers in (None, -1) or overrides.gpu_layers > shape.n_layer
        slot_choices = [overrides.slots] if overrides.slots else list(dict.fromkeys([32, _cpu_slots(hw)[0]]))
        for slots in slot_choices if full_ok else []:
            for kv in _kv_candidates(shape, slots, explicit_kv):
                need = _weights_and_kv(shape, kv) + _COMPUTE_RESERVE_BYTES
                if need <= gpu_room:
                    placed = (shape.n_layer + 1, slots, kv, _COMPUTE_RESERVE_BYTES, need)
                    reasons["gpu_layers"] = f"all {shape.n_layer} layers and the output: {mib(need)} (weights, KV, compute) fit in {free}"
                    reasons["slots"] = "set in the config" if overrides.slots else (
                        "32 with every layer on a GPU" if slots == 32 else f"{slots}: 32 would not fit with every layer on the GPU")
                    kv_why = kv_why or _kv_reason(shape, slots, kv, False, free)
                    break
            if placed is not None:
                break
        if placed is None and full_ok and overrides.gpu_layers is not None:
            need = _weights_and_kv(shape, _kv_candidates(shape, slot_choices[-1], explicit_kv)[-1]) + _COMPUTE_RESERVE_BYTES
            raise ModelDoesNotFit(f"gpu_layers = {overrides.gpu_layers} (every layer) was asked for but the model and its "
                                  f"smallest KV cache need about {mib(need)} and {free}")
        if placed is None:
            slots, slot_why = (overrides.slots, "set in the config") if overrides.slots else _cpu_slots(hw)
            forced = overrides.gpu_layers if overrides.gpu_layers not in (None, -1) else None
            for kv in _kv_candidates(shape, slots, explicit_kv):
                total = _weights_and_kv(shape, kv)
                per_layer = total / shape.n_layer
                layers = forced if forced is not None else min(shape.n_layer - 1, math.floor(gpu_room / per_layer))
                layers = min(layers, shape.n_layer)
                on_gpu = int(per_layer * layers)
                host = total - on_gpu + _COMPUTE_RESERVE_BYTES
                if on_gpu <= gpu_room and host <= host_room and layers > 0:
                    placed = (layers, slots, kv, host, on_gpu)
                    reasons["gpu_layers"] = ("set in the config" if forced is not None else
                                             f"{layers} of {shape.n_layer} layers (partial offload): the model and its KV cache "
                                             f"need {mib(total)}, {free}; {mib(total - on_gpu)} stays in RAM and decodes on the CPU")
                    reasons["slots"] = slot_why
                    kv_why = kv_why or _kv_reason(shape, slots, kv, False, "RAM and GPU memory")
                    break
            if placed is None and overrides.gpu_layers:
                total = _weights_and_kv(shape, _kv_candidates(shape, slots, explicit_kv)[-1])
                raise ModelDoesNotFit(f"gpu_layers = {overrides.gpu_layers} was asked for but the model and its KV cache "
                                      f"need about {mib(total)} and {free}")
            if placed is None:
                reasons["gpu_layers"] = f"0: not one layer fits in {free}; the model runs on the CPU"

    if placed is None:
        slots, slot_why = (overrides.slots, "set in the config") if overrides.slots else _cpu_slots(hw)
        if gpu is None:
            reasons.setdefault("gpu_layers", f"0: no NVIDIA GPU ({hw.gpu.reason or 'none found'})")
        elif not gpu_offload_supported:
            reasons.setdefault("gpu_layers", "0: this llama.cpp build cannot offload (a CPU-only build)")
        elif overrides.gpu_layers == 0:
            reasons.setdefault("gpu_layers", "set in the config")
        candidates = _kv_candidates(shape, slots, explicit_kv)
        kv = candidates[-1]
        for kv in candidates:
            if _weights_and_kv(shape, kv) + _COMPUTE_RESERVE_BYTES <= host_room:
                break
        need = _weights_and_kv(shape, kv) + _COMPUTE_RESERVE_BYTES
        if need > host_room:
            raise ModelDoesNotFit(
                f"needs about {need // MIB} MiB (weights {shape.file_bytes // MIB} MiB + KV cache for "
                f"{kv} tokens {kv * shape.kv_bytes_per_token // MIB} MiB + "
                f"{_COMPUTE_RESERVE_BYTES // MIB} MiB compute) but only {host_room // MIB} MiB is available"
            )
        placed = (0, slots, kv, need, 0)
        reasons["slots"] = slot_why
        kv_why = kv_why or _kv_reason(shape, slots, kv, False, f"{mib(host_room)} of RAM")
    layers, slots, kv_tokens, host_bytes, gpu_bytes = placed
    reasons["kv_tokens"] = kv_why
    full_gpu = layers > shape.n_layer
    batch = overrides.batch_tokens or (2048 if full_gpu else 512)
    reasons["batch_tokens"] = "set in the config" if overrides.batch_tokens else (
        "2048 with every layer on a GPU (large prompt chunks keep it busy)" if full_gpu else
        "512: a long prompt is split into 512-token steps so running streams keep decoding between its chunks")
    waiting = overrides.max_waiting if overrides.max_waiting is not None else 4 * slots
    reasons["max_waiting"] = "set in the config" if overrides.max_waiting is not None else (
        f"4 per slot: past {waiting} waiting, a request gets 429 + Retry-After instead of a long silent wait")
    return LlmTuning(
        threads=threads,
        gpu_layers=layers,
        slots=slots,
        kv_tokens=kv_tokens,
        max_context=min(shape.n_ctx_train, kv_tokens),
        batch_tokens=batch,
        max_waiting=waiting,
        estimated_bytes=host_bytes,
        gpu_bytes=gpu_bytes,
        reasons=reasons,
    )


def tune_embedding(
    hw: HardwareInfo,
    max_tokens_per_input: int,
    threads: int | None = None,
    max_batch_requests: int | None = None,
    max_batch_tokens: int | None = None,
    max_waiting: int | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> EmbeddingTuning:
    """Settings for one ONNX embedding model: batches of up to 32 inputs (the engine's plateau on
    CPU: 598 embeddings/s at 32 against 566 at 8 on MiniLM-L6), CUDA when onnxruntime has it and a
    GPU is present."""
    use_cuda = hw.gpu.count > 0 and "CUDAExecutionProvider" in providers
    batch = max_batch_requests or (128 if use_cuda else 32)
    reasons = {
        "threads": "set in the config" if threads else cores_reason(hw),
        "provider": ("CUDA: a GPU is present and onnxruntime has its execution provider" if use_cuda else
                     "CPU: " + ("no NVIDIA GPU" if hw.gpu.count == 0 else "onnxruntime has no CUDA execution provider")),
        "max_batch_requests": "set in the config" if max_batch_requests else (
            "128 on a GPU" if use_cuda else "32: onnxruntime's throughput plateau on CPU (598/s at 32 against 566 at 8)"),
        "max_batch_tokens": "set in the config" if max_batch_tokens else "the batch times the longest input",
        "max_waiting": "set in the config" if max_waiting is not None else
        "8192 inputs: embeddings are short; a full queue answers 429 + Retry-After",
    }
    return EmbeddingTuning(
        threads=threads or hw.usable_cores,
        max_batch_requests=batch,
        max_batch_tokens=max_batch_tokens or batch * max_tokens_per_input,
        max_waiting=max_waiting if max_waiting is not None else 8192,
        provider="CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider",
        reasons=reasons,
    )
