"""Hardware detection and tuning. No model code lives here.

Public surface:
- ``detect()`` -> ``HardwareInfo``: CPU, RAM, container limits, NVIDIA GPUs.
- ``tune_llm()`` / ``tune_embedding()``: threads, slots, context and queue sizes from what was detected.
"""

from hardware.detect import CgroupLimits, CpuInfo, HardwareInfo, MemoryInfo, detect
from hardware.nvml import GpuInfo, GpuStatus, detect_gpus
from hardware.tuning import EmbeddingTuning, LlmTuning, ModelDoesNotFit, tune_embedding, tune_llm

__all__ = [
    "CgroupLimits",
    "CpuInfo",
    "EmbeddingTuning",
    "GpuInfo",
    "GpuStatus",
    "HardwareInfo",
    "LlmTuning",
    "MemoryInfo",
    "ModelDoesNotFit",
    "detect",
    "detect_gpus",
    "tune_embedding",
    "tune_llm",
]
