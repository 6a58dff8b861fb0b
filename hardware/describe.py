"""The facts ``understudy hardware`` prints, as two-column rows (label, value).

``hardware_rows(hw, caps)`` is pure: ``server.cli.cmd_hardware`` calls it once with ``detect()``'s
``HardwareInfo`` and ``models.capabilities.engine_caps()`` and prints the rows as a table (the
``--json`` form is ``HardwareInfo.to_dict()``). A value that was not detected is shown as ``-``.
"""

from __future__ import annotations

from hardware.detect import HardwareInfo
from hardware.fallbacks import EngineCaps
from hardware.nvml import GpuInfo
from hardware.tuning import MIB


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n // 1024} KiB"


def _or_dash(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _mhz(value: float | None) -> str:
    return "-" if value is None else str(round(value))


def _cpu_rows(hw: HardwareInfo) -> list[list[str]]:
    cpu, cg = hw.cpu, hw.cgroup
    numa = "-" if cpu.numa_nodes is None else \
        f"{cpu.numa_nodes} node{'s' if cpu.numa_nodes != 1 else ''}: CPUs {'; '.join(cpu.numa_cpulists)}"
    return [
        ["CPU", cpu.model],
        ["Architecture", cpu.arch],
        ["Cores", f"{cpu.physical_cores} physical, {cpu.logical_cores} logical, {cpu.affinity_cores} allowed"],
        ["CPU MHz", f"{_mhz(cpu.freq_max_mhz)} max, {_mhz(cpu.freq_current_mhz)} now"],
        ["CPU cache", f"L2 {_size(cpu.l2_cache_bytes)}, L3 {_size(cpu.l3_cache_bytes)} (as seen by CPU 0)"],
        ["NUMA", numa],
        ["CPU features", " ".join(cpu.flags) or "-"],
        ["RAM", f"{hw.memory.total_bytes // MIB} MiB total, {hw.memory.available_bytes // MIB} MiB available"],
        ["Container limits", "none" if cg.version is None else
         f"cgroup {cg.version}: cpu {cg.cpu_quota_cores if cg.cpu_quota_cores is not None else 'unlimited'}, "
         f"memory {cg.memory_limit_bytes // MIB if cg.memory_limit_bytes else 'unlimited'}{' MiB' if cg.memory_limit_bytes else ''}"],
        ["Usable", f"{hw.usable_cores} cores for compute threads, {hw.usable_memory_bytes // MIB} MiB for models"],
    ]


def _gpu_rows(g: GpuInfo) -> list[list[str]]:
    util = "-" if g.utilization_gpu_pct is None else \
        f"{g.utilization_gpu_pct} % (memory {_or_dash(g.utilization_memory_pct, ' %')})"
    return [
        [f"GPU {g.index}", f"{g.name}, compute capability {g.compute_capability or '-'}, "
                           f"{g.memory_free_bytes // MIB} of {g.memory_total_bytes // MIB} MiB free"],
        [f"GPU {g.index} load", f"temperature {_or_dash(g.temperature_c, ' C')}, power {_or_dash(g.power_draw_w)} of "
                                f"{_or_dash(g.power_limit_w, ' W')}, utilisation {util}"],
    ]


def hardware_rows(hw: HardwareInfo, caps: EngineCaps) -> list[list[str]]:
    """Rows for ``understudy hardware``: CPU, memory, container limits, GPUs, installed engines."""
    rows = _cpu_rows(hw)
    if hw.gpu.gpus:
        rows.append(["GPU driver", f"{hw.gpu.driver_version} (CUDA {hw.gpu.cuda_driver_version or '?'})"])
        for g in hw.gpu.gpus:
            rows += _gpu_rows(g)
        if hw.gpu.reason:
            rows.append(["GPU problems", hw.gpu.reason])
    else:
        rows.append(["GPUs", f"none ({hw.gpu.reason})"])
    rows.append(["llama.cpp build", f"GPU offload {'yes' if caps.llama_gpu_offload else 'no'}; "
                                    f"{' '.join(sorted(caps.llama_features)) or 'features unknown'}"])
    rows.append(["onnxruntime", ", ".join(caps.onnx_providers) or "not installed"])
    return rows
