"""NVIDIA GPU detection through NVML.

``detect_gpus()`` never raises: without the ``pynvml`` module, without the NVML shared library
(``libnvidia-ml.so``, which ships with the NVIDIA driver) or without a GPU it returns a
``GpuStatus`` whose ``gpus`` is empty and whose ``reason`` says why. The module is injectable so
tests can pass a fake NVML with the same functions and exception class as ``pynvml``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str | None = None


@dataclass(frozen=True)
class GpuStatus:
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    reason: str | None = None
    """Why no GPU is listed (None when detection ran and found what ``gpus`` says)."""

    @property
    def count(self) -> int:
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "reason": self.reason,
            "gpus": [g.__dict__.copy() for g in self.gpus],
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(raw: int) -> str:
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def detect_gpus(nvml: ModuleType | None = None) -> GpuStatus:
    """Query NVML once; callers: ``hardware.detect()`` at start-up and ``understudy hardware``."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return GpuStatus(reason="pynvml (nvidia-ml-py) is not installed")
    error_type: type[BaseException] = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except error_type as exc:
        return GpuStatus(reason=f"NVML unavailable: {exc}")
    except OSError as exc:  # a broken libnvidia-ml.so can surface as OSError
        return GpuStatus(reason=f"NVML unavailable: {exc}")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            cuda: str | None = _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion()))
        except error_type:
            cuda = None
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: str | None = f"{major}.{minor}"
            except error_type:
                capability = None
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                    compute_capability=capability,
                )
            )
        return GpuStatus(
            gpus=tuple(gpus),
            driver_version=driver,
            cuda_driver_version=cuda,
            reason=None if gpus else "NVML found no GPU",
        )
    except error_type as exc:
        return GpuStatus(reason=f"NVML query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except error_type:
            pass
