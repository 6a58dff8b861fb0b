"""CPU, memory and container-limit detection.

``detect()`` is called once by ``understudy serve`` (``server.cli``) and by ``understudy hardware``. It reads
``/proc/cpuinfo``, a few ``/sys`` files and the cgroup files under ``root`` (injectable so tests can
point it at a fake tree), psutil for core counts and RAM (always this machine's), and NVML through
``hardware.nvml``. It reads files only (no subprocess): ``understudy hardware --json`` stays well
under a second. It never raises on a missing file: a value that cannot be read is ``None`` or empty.

Container limits are read from the cgroup mounted at ``/sys/fs/cgroup`` as seen from inside the
container (v2 ``cpu.max``/``memory.max``; v1 ``cpu.cfs_quota_us``/``memory.limit_in_bytes``).

Topology and speed (``CpuInfo``):
- NUMA: one entry per ``sys/devices/system/node/node<N>/cpulist``, in node order. No readable node
  directory (not Linux, ``/sys`` not mounted, a kernel without NUMA) gives ``numa_nodes = None``
  (unknown; treat it as one node), never a guessed 1.
- Frequency: ``cpu0/cpufreq/cpuinfo_max_freq`` and ``scaling_cur_freq`` (kHz) as MHz. VMs often have
  no ``cpufreq``: the current frequency then falls back to the first ``cpu MHz`` of
  ``/proc/cpuinfo``; the maximum stays ``None``.
- Caches: ``cpu0/cache/index*/{level,type,size}``. The L3 figure is the slice cpu0 shares (one CCX
  on AMD, one socket on Intel), not the machine's total; L2 is per core.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from hardware.nvml import GpuStatus, detect_gpus

# Flags that matter to llama.cpp / onnxruntime kernels, in the order we print them.
_INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimddp", "sve", "sve2", "i8mm", "bf16",
)
# cgroup v1 reports "no limit" as a huge page-aligned number.
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    physical_cores: int
    logical_cores: int
    affinity_cores: int
    flags: tuple[str, ...]
    numa_nodes: int | None = None
    """NUMA nodes; None when ``/sys/devices/system/node`` cannot be read (unknown, treat as one)."""
    numa_cpulists: tuple[str, ...] = ()
    """Each node's CPUs in the kernel's cpulist syntax (``"0-31,64-95"``), node 0 first."""
    freq_max_mhz: float | None = None
    freq_current_mhz: float | None = None
    l2_cache_bytes: int | None = None
    l3_cache_bytes: int | None = None


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class CgroupLimits:
    version: str | None = None
    cpu_quota_cores: float | None = None
    memory_limit_bytes: int | None = None
    memory_used_bytes: int | None = None


@dataclass(frozen=True)
class HardwareInfo:
    cpu: CpuInfo
    memory: MemoryInfo
    cgroup: CgroupLimits
    gpu: GpuStatus = field(default_factory=GpuStatus)

    @property
    def usable_cores(self) -> int:
        """Cores worth giving to compute threads: physical cores, capped by affinity and cgroup quota."""
        cores = min(self.cpu.physical_cores, self.cpu.affinity_cores)
        if self.cgroup.cpu_quota_cores is not None:
            cores = min(cores, max(1, math.floor(self.cgroup.cpu_quota_cores)))
        return max(1, cores)

    @property
    def usable_memory_bytes(self) -> int:
        """RAM a new model may take: available RAM, capped by what the cgroup limit leaves."""
        usable = self.memory.available_bytes
        if self.cgroup.memory_limit_bytes is not None:
            left = self.cgroup.memory_limit_bytes - (self.cgroup.memory_used_bytes or 0)
            usable = min(usable, max(0, left))
        return usable

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu.__dict__ | {"flags": list(self.cpu.flags), "numa_cpulists": list(self.cpu.numa_cpulists)},
            "memory": self.memory.__dict__.copy(),
            "cgroup": self.cgroup.__dict__.copy(),
            "gpu": self.gpu.to_dict(),
            "usable_cores": self.usable_cores,
            "usable_memory_bytes": self.usable_memory_bytes,
        }


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpuinfo(root: Path) -> tuple[str, tuple[str, ...], float | None]:
    """Model name, interesting flags and the first ``cpu MHz`` (x86 only) from ``/proc/cpuinfo``."""
    text = _read(root / "proc/cpuinfo") or ""
    model = ""
    mhz: float | None = None
    raw_flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            raw_flags.update(value.split())
        elif key == "cpu mhz" and mhz is None:
            mhz = _positive_float(value.strip())
    if "asimd" in raw_flags:  # ARM spells NEON "asimd"
        raw_flags.add("neon")
    flags = tuple(f for f in _INTERESTING_FLAGS if f in raw_flags)
    return model or platform.processor() or "unknown", flags, mhz


def _positive_float(text: str | None) -> float | None:
    try:
        value = float(text) if text else 0.0
    except ValueError:
        return None
    return value if value > 0 else None


def _numa(root: Path) -> tuple[int | None, tuple[str, ...]]:
    """(node count, each node's cpulist); (None, ()) when the node directory cannot be read."""
    try:
        nodes = [p for p in (root / "sys/devices/system/node").iterdir()
                 if p.name.startswith("node") and p.name[4:].isdigit()]
    except OSError:
        return None, ()
    if not nodes:
        return None, ()
    nodes.sort(key=lambda p: int(p.name[4:]))
    return len(nodes), tuple(_read(p / "cpulist") or "" for p in nodes)


def _freq_mhz(root: Path, cpuinfo_mhz: float | None) -> tuple[float | None, float | None]:
    """(max, current) MHz of cpu0 from cpufreq (kHz); current falls back to ``/proc/cpuinfo``."""
    base = root / "sys/devices/system/cpu/cpu0/cpufreq"
    khz_max = _positive_float(_read(base / "cpuinfo_max_freq"))
    khz_cur = _positive_float(_read(base / "scaling_cur_freq"))
    return (khz_max / 1000 if khz_max else None,
            khz_cur / 1000 if khz_cur else cpuinfo_mhz)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size_bytes(text: str | None) -> int | None:
    """The kernel's cache ``size`` ("32768K", "1M", "512") in bytes; None when unparsable."""
    if not text:
        return None
    text = text.strip().upper()
    number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G") else (text, "")
    return int(number) * _SIZE_UNITS[unit] if number.isdigit() and int(number) > 0 else None


def _caches(root: Path) -> dict[int, int]:
    """Level -> size in bytes of cpu0's data/unified caches (instruction caches skipped)."""
    out: dict[int, int] = {}
    try:
        indexes = sorted((root / "sys/devices/system/cpu/cpu0/cache").glob("index*"))
    except OSError:
        return out
    for index in indexes:
        level = _int_or_none(_read(index / "level"))
        size = _size_bytes(_read(index / "size"))
        if level is None or size is None or (_read(index / "type") or "").lower() == "instruction":
            continue
        out.setdefault(level, size)
    return out


def _int_or_none(text: str | None) -> int | None:
    if text is None or not text.lstrip("-").isdigit():
        return None
    return int(text)


def read_cgroup(root: Path = Path("/")) -> CgroupLimits:
    base = root / "sys/fs/cgroup"
    cpu_max = _read(base / "cpu.max")
    mem_max = _read(base / "memory.max")
    if cpu_max is not None or mem_max is not None:
        quota: float | None = None
        if cpu_max:
            parts = cpu_max.split()
            if len(parts) == 2 and parts[0] != "max":
                quota = int(parts[0]) / int(parts[1])
        return CgroupLimits(
            version="v2",
            cpu_quota_cores=quota,
            memory_limit_bytes=_int_or_none(mem_max),
            memory_used_bytes=_int_or_none(_read(base / "memory.current")),
        )
    cfs_quota = _int_or_none(_read(base / "cpu/cpu.cfs_quota_us"))
    cfs_period = _int_or_none(_read(base / "cpu/cpu.cfs_period_us"))
    mem_limit = _int_or_none(_read(base / "memory/memory.limit_in_bytes"))
    if cfs_quota is None and mem_limit is None:
        return CgroupLimits()
    return CgroupLimits(
        version="v1",
        cpu_quota_cores=cfs_quota / cfs_period if cfs_quota and cfs_quota > 0 and cfs_period else None,
        memory_limit_bytes=mem_limit if mem_limit is not None and mem_limit < _V1_UNLIMITED else None,
        memory_used_bytes=_int_or_none(_read(base / "memory/memory.usage_in_bytes")),
    )


def detect(root: Path = Path("/"), nvml: ModuleType | None = None, with_gpu: bool = True) -> HardwareInfo:
    """Detect this machine. ``nvml`` replaces the ``pynvml`` module (tests pass a fake)."""
    model, flags, cpuinfo_mhz = _cpuinfo(root)
    numa_nodes, numa_cpulists = _numa(root)
    freq_max, freq_current = _freq_mhz(root, cpuinfo_mhz)
    caches = _caches(root)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = logical
    vm = psutil.virtual_memory()
    return HardwareInfo(
        cpu=CpuInfo(
            model=model,
            arch=platform.machine(),
            physical_cores=physical,
            logical_cores=logical,
            affinity_cores=affinity,
            flags=flags,
            numa_nodes=numa_nodes,
            numa_cpulists=numa_cpulists,
            freq_max_mhz=freq_max,
            freq_current_mhz=freq_current,
            l2_cache_bytes=caches.get(2),
            l3_cache_bytes=caches.get(3),
        ),
        memory=MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available)),
        cgroup=read_cgroup(root),
        gpu=detect_gpus(nvml) if with_gpu else GpuStatus(reason="GPU detection skipped"),
    )
