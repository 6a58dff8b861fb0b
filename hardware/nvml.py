"""NVIDIA GPU detection through NVML.

``detect_gpus()`` never raises: without the ``pynvml`` module, without the NVML shared library
(``libnvidia-ml.so``, which ships with the NVIDIA driver) or without a GPU it returns a
``GpuStatus`` whose ``gpus`` is empty and whose ``reason`` says why. The module is injectable so
tests can pass a fake NVML with the same functions and exception class as ``pynvml``
(``tests/fake_nvml.py``).

Per GPU, name, UUID and memory are required: a GPU whose required query fails (``GPU is lost``...)
is left out and ``reason`` names it. Compute capability, memory used, temperature, power draw and
limit, and utilisation are optional: a query the GPU or driver refuses (``Not Supported`` on
laptops and vGPUs, ``Insufficient Permissions``, a function an old driver lacks) leaves that field
``None``. ``nvmlShutdown`` is called after every successful ``nvmlInit``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")
_NVML_ERROR_GPU_IS_LOST = 15  # pynvml.NVML_ERROR_GPU_IS_LOST
_NVML_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str | None = None
    memory_used_bytes: int | None = None
    temperature_c: int | None = None
    """Core temperature in degrees Celsius."""
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    """The enforced power limit (what the board may draw now), in watts."""
    utilization_gpu_pct: int | None = None
    """Percent of the last sample period during which a kernel ran (0-100)."""
    utilization_memory_pct: int | None = None
    """Percent of the last sample period during which device memory was read or written (0-100)."""


@dataclass(frozen=True)
class GpuStatus:
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    reason: str | None = None
    """Why no GPU is listed, or why a GPU that NVML counts is missing from ``gpus``; else None."""

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


def _optional(nvml: Any, error_type: type[BaseException], fn: str, *args: Any) -> Any:
    """``nvml.<fn>(*args)``, or None when the driver refuses it or this pynvml lacks it.

    A lost GPU is not a missing feature: ``GPU is lost`` is re-raised so the GPU is left out.
    """
    call = getattr(nvml, fn, None)
    if call is None:
        return None
    try:
        return call(*args)
    except error_type as exc:
        if getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", _NVML_ERROR_GPU_IS_LOST):
            raise
        return None


def _maybe(value: Any, convert: Callable[[Any], T]) -> T | None:
    return None if value is None else convert(value)


def _gpu(nvml: Any, error_type: type[BaseException], index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = _text(nvml.nvmlDeviceGetName(handle))
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    capability = _optional(nvml, error_type, "nvmlDeviceGetCudaComputeCapability", handle)
    sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)
    temperature = _optional(nvml, error_type, "nvmlDeviceGetTemperature", handle, sensor)
    power = _optional(nvml, error_type, "nvmlDeviceGetPowerUsage", handle)
    limit = _optional(nvml, error_type, "nvmlDeviceGetEnforcedPowerLimit", handle)
    util = _optional(nvml, error_type, "nvmlDeviceGetUtilizationRates", handle)
    return GpuInfo(
        index=index,
        name=name,
        uuid=uuid,
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        compute_capability=_maybe(capability, lambda c: f"{c[0]}.{c[1]}"),
        memory_used_bytes=_maybe(getattr(memory, "used", None), int),
        temperature_c=_maybe(temperature, int),
        power_draw_w=_maybe(power, lambda mw: int(mw) / 1000),
        power_limit_w=_maybe(limit, lambda mw: int(mw) / 1000),
        utilization_gpu_pct=_maybe(util, lambda u: int(u.gpu)),
        utilization_memory_pct=_maybe(util, lambda u: int(u.memory)),
    )


def detect_gpus(nvml: ModuleType | Any | None = None) -> GpuStatus:
    """Query NVML once; callers: ``hardware.detect()`` at start-up and ``understudy hardware``."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return GpuStatus(reason="pynvml (nvidia-ml-py) is not installed")
    error_type: type[BaseException] = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except (error_type, OSError) as exc:  # a broken libnvidia-ml.so can surface as OSError
        return GpuStatus(reason=f"NVML unavailable: {exc}")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _maybe(_optional(nvml, error_type, "nvmlSystemGetCudaDriverVersion"), lambda v: _cuda_version(int(v)))
        count = int(nvml.nvmlDeviceGetCount())
        gpus, problems = [], []
        for index in range(count):
            try:
                gpus.append(_gpu(nvml, error_type, index))
            except error_type as exc:
                problems.append(f"GPU {index} left out: {exc}")
        reason = "; ".join(problems) or (None if gpus else "NVML found no GPU")
        return GpuStatus(gpus=tuple(gpus), driver_version=driver, cuda_driver_version=cuda, reason=reason)
    except error_type as exc:
        return GpuStatus(reason=f"NVML query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except error_type:
            pass
