"""A faithful fake of the ``pynvml`` module (nvidia-ml-py) for the GPU detection path.

Same function names, same return shapes (bytes or str names, a memory struct with
``total``/``free``/``used``), same exception class hierarchy, so ``hardware.nvml`` runs
unchanged against it. ``library_missing=True`` behaves like a machine without the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 999: "Unknown Error"}.get(self.value, f"NVML error {self.value}")


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12)


@dataclass
class FakeGpu:
    name: str
    total: int
    used: int
    uuid: str
    capability: tuple[int, int] = (9, 0)


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound

    def __init__(self, gpus: list[FakeGpu], driver: str = "580.65.06", cuda: int = 13000,
                 library_missing: bool = False, name_as_bytes: bool = False) -> None:
        self._gpus = gpus
        self._driver = driver
        self._cuda = cuda
        self._missing = library_missing
        self._bytes = name_as_bytes
        self.initialized = 0

    def nvmlInit(self) -> None:
        if self._missing:
            raise NVMLError_LibraryNotFound()
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        if self.initialized <= 0:
            raise NVMLError(1)
        self.initialized -= 1

    def _check(self) -> None:
        if self.initialized <= 0:
            raise NVMLError(1)

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._check()
        return self._driver.encode() if self._bytes else self._driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        return self._cuda

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        if not 0 <= index < len(self._gpus):
            raise NVMLError(2)
        return self._gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        return handle.name.encode() if self._bytes else handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str | bytes:
        return handle.uuid.encode() if self._bytes else handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(total=handle.total, used=handle.used, free=handle.total - handle.used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return handle.capability
