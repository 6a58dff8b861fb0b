"""A faithful fake of the ``pynvml`` module (nvidia-ml-py) for the GPU detection path.

Used by ``tests/test_hardware.py`` and ``tests/test_hardware_detect.py`` through
``hardware.nvml.detect_gpus(fake)`` / ``hardware.detect.detect(nvml=fake)``. Same function names
and parameters, constant names and values, error messages and exception shape as ``pynvml``
(``NVMLError(code)`` builds the per-code subclass, e.g. ``NVMLError_NotSupported``, with ``.value``);
``test_hardware_detect`` checks every public name here against the real module.

Scenarios (constructor arguments):
- ``FakeNvml([], library_missing=True)``: no ``libnvidia-ml.so`` (``nvmlInit`` raises LibraryNotFound).
- ``FakeNvml([], driver_not_loaded=True)``: library present, kernel driver not loaded.
- ``FakeNvml([])``: NVML initialises, no device.
- ``FakeNvml([FakeGpu(...), ...])``: one GPU per ``FakeGpu(name, total, used, uuid, capability)``;
  ``used`` close to ``total`` is a GPU mostly used by someone else.
- ``FakeGpu(..., errors={"nvmlDeviceGetTemperature": NVML_ERROR_NOT_SUPPORTED})``: that query raises
  that code on that GPU (``not_supported(*TELEMETRY)`` for a laptop/vGPU without sensors,
  ``{"nvmlDeviceGetMemoryInfo": NVML_ERROR_GPU_IS_LOST}`` for a GPU lost mid-query).
- ``name_as_bytes=True``: strings come back as bytes, like pynvml before 11.5.
``initialized`` counts ``nvmlInit`` calls not yet matched by ``nvmlShutdown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

#: The optional per-GPU telemetry queries (what laptops and vGPUs often refuse).
TELEMETRY = ("nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
             "nvmlDeviceGetUtilizationRates")


class NVMLError(Exception):
    """``NVMLError(code)`` returns an instance of the subclass registered for ``code``, like pynvml."""

    _by_code: dict[int, type[NVMLError]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, NVMLError)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(code: int, name: str) -> type[NVMLError]:
    def new(cls: type[NVMLError], *args: object) -> NVMLError:
        return NVMLError.__new__(cls, code)

    sub = type(name, (NVMLError,), {"__new__": new})
    NVMLError._by_code[code] = sub
    return sub


NVMLError_Uninitialized = _error_class(NVML_ERROR_UNINITIALIZED, "NVMLError_Uninitialized")
NVMLError_InvalidArgument = _error_class(NVML_ERROR_INVALID_ARGUMENT, "NVMLError_InvalidArgument")
NVMLError_NotSupported = _error_class(NVML_ERROR_NOT_SUPPORTED, "NVMLError_NotSupported")
NVMLError_NoPermission = _error_class(NVML_ERROR_NO_PERMISSION, "NVMLError_NoPermission")
NVMLError_NotFound = _error_class(NVML_ERROR_NOT_FOUND, "NVMLError_NotFound")
NVMLError_DriverNotLoaded = _error_class(NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded")
NVMLError_LibraryNotFound = _error_class(NVML_ERROR_LIBRARY_NOT_FOUND, "NVMLError_LibraryNotFound")
NVMLError_GpuIsLost = _error_class(NVML_ERROR_GPU_IS_LOST, "NVMLError_GpuIsLost")
NVMLError_Unknown = _error_class(NVML_ERROR_UNKNOWN, "NVMLError_Unknown")


def not_supported(*queries: str) -> dict[str, int]:
    """``errors=`` for a GPU that answers NOT_SUPPORTED to ``queries``."""
    return {q: NVML_ERROR_NOT_SUPPORTED for q in queries}


@dataclass
class FakeGpu:
    name: str
    total: int
    used: int
    uuid: str
    capability: tuple[int, int] = (9, 0)
    temperature_c: int = 34
    power_mw: int = 72_500
    power_limit_mw: int = 700_000
    utilization: tuple[int, int] = (3, 1)  # (gpu %, memory %)
    errors: dict[str, int] = field(default_factory=dict)
    """Query name -> NVML error code that query raises on this GPU."""


class FakeNvml:
    """Stands in for the ``pynvml`` module: pass an instance where ``hardware.nvml`` takes the module."""

    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(self, gpus: list[FakeGpu], driver: str = "580.65.06", cuda: int = 13000,
                 library_missing: bool = False, name_as_bytes: bool = False,
                 driver_not_loaded: bool = False) -> None:
        self._gpus = gpus
        self._driver = driver
        self._cuda = cuda
        self._missing = library_missing
        self._no_driver = driver_not_loaded
        self._bytes = name_as_bytes
        self.initialized = 0

    # -- library ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self._missing:
            raise NVMLError_LibraryNotFound()
        if self._no_driver:
            raise NVMLError_DriverNotLoaded()
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.initialized -= 1

    def _check(self) -> None:
        if self.initialized <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _str(self, text: str) -> str | bytes:
        return text.encode() if self._bytes else text

    def _device(self, handle: FakeGpu, query: str) -> FakeGpu:
        self._check()
        if handle not in self._gpus:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if query in handle.errors:
            raise NVMLError(handle.errors[query])
        return handle

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._check()
        return self._str(self._driver)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        return self._cuda

    # -- devices ------------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        if not 0 <= index < len(self._gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        return self._str(self._device(handle, "nvmlDeviceGetName").name)

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str | bytes:
        return self._str(self._device(handle, "nvmlDeviceGetUUID").uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: int | None = None) -> SimpleNamespace:
        gpu = self._device(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu.total, free=gpu.total - gpu.used, used=gpu.used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return self._device(handle, "nvmlDeviceGetCudaComputeCapability").capability

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        gpu = self._device(handle, "nvmlDeviceGetTemperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return self._device(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        return self._device(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        gpu, memory = self._device(handle, "nvmlDeviceGetUtilizationRates").utilization
        return SimpleNamespace(gpu=gpu, memory=memory)
