"""Detection against fixture trees and the fake NVML; the fake checked against the real pynvml.

psutil core counts and RAM always come from this machine; only ``/proc``, ``/sys`` and the cgroup
files come from the fixture ``root``.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import psutil
import pynvml
import pytest

from hardware.describe import hardware_rows
from hardware.detect import detect
from hardware.fallbacks import EngineCaps
from hardware.nvml import detect_gpus
from hardware.tuning import LlmShape, tune_llm
from tests import fake_nvml
from tests.fake_nvml import TELEMETRY, FakeGpu, FakeNvml, not_supported

GIB = 1024**3
MIB = 1024**2
SMOL = LlmShape(file_bytes=98_362_432, n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ctx_train=8192)
NO_GPU = FakeNvml([], library_missing=True)


def _h200(uuid: str = "GPU-0", **kw: object) -> FakeGpu:
    return FakeGpu("NVIDIA H200", total=141 * GIB, used=1 * GIB, uuid=uuid, **kw)  # type: ignore[arg-type]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def _real_cores() -> int:
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return min(physical, len(os.sched_getaffinity(0)))


# -- the fake cannot drift from the real pynvml ------------------------------------------------

def test_every_public_name_of_the_fake_exists_in_pynvml_with_the_same_shape() -> None:
    names = [n for n in dir(FakeNvml) if not n.startswith("_")] + list(TELEMETRY)
    assert len(names) > 20
    for name in names:
        real, fake = getattr(pynvml, name, None), getattr(FakeNvml, name)
        assert real is not None, f"pynvml has no {name}"
        if isinstance(fake, int):
            assert fake == real, name
        elif isinstance(fake, type):
            assert issubclass(real, pynvml.NVMLError) and fake.__name__ == real.__name__
        else:
            fake_params = list(inspect.signature(fake).parameters)[1:]  # without self
            assert fake_params == list(inspect.signature(real).parameters), name


def test_fake_errors_are_built_and_worded_like_pynvmls() -> None:
    codes = [getattr(FakeNvml, n) for n in dir(FakeNvml) if n.startswith("NVML_ERROR_")]
    for code in codes:
        fake, real = fake_nvml.NVMLError(code), pynvml.NVMLError(code)
        assert type(fake).__name__ == type(real).__name__ != "NVMLError"
        assert (fake.value, str(fake)) == (real.value, str(real))
        assert isinstance(fake, fake_nvml.NVMLError)
        no_arg = getattr(fake_nvml, type(fake).__name__)()  # pynvml's subclasses take no argument
        assert no_arg.value == code and type(no_arg) is type(fake)


def test_the_fakes_missing_library_reads_like_the_real_one_on_a_machine_without_a_driver() -> None:
    real = detect_gpus()
    if real.gpus or "Library Not Found" not in (real.reason or ""):
        pytest.skip("this machine has an NVIDIA driver")
    assert detect_gpus(FakeNvml([], library_missing=True)) == real


# -- NVML scenarios ----------------------------------------------------------------------------

@pytest.mark.parametrize(("fake", "words"), [
    (FakeNvml([], library_missing=True), "NVML Shared Library Not Found"),
    (FakeNvml([_h200()], driver_not_loaded=True), "Driver Not Loaded"),
    (FakeNvml([]), "NVML found no GPU"),
])
def test_no_usable_nvml_is_a_reason_not_an_exception(fake: FakeNvml, words: str) -> None:
    status = detect_gpus(fake)
    assert status.gpus == () and status.reason is not None and words in status.reason
    assert fake.initialized == 0


def test_one_gpu_reports_memory_temperature_power_and_utilisation() -> None:
    fake = FakeNvml([_h200(temperature_c=41, power_mw=123_456, power_limit_mw=600_000, utilization=(87, 40))])
    status = detect_gpus(fake)
    (gpu,) = status.gpus
    assert status.reason is None and fake.initialized == 0
    assert gpu.memory_used_bytes == 1 * GIB and gpu.memory_free_bytes == 140 * GIB
    assert (gpu.temperature_c, gpu.power_draw_w, gpu.power_limit_w) == (41, 123.456, 600.0)
    assert (gpu.utilization_gpu_pct, gpu.utilization_memory_pct) == (87, 40)
    listed = json.loads(json.dumps(status.to_dict()))["gpus"][0]
    assert listed["power_draw_w"] == 123.456 and listed["temperature_c"] == 41 and listed["memory_used_bytes"] == GIB


def test_two_gpus_are_listed_in_nvml_order() -> None:
    fake = FakeNvml([_h200("GPU-a"), FakeGpu("NVIDIA L4", total=24 * GIB, used=0, uuid="GPU-b", capability=(8, 9))])
    status = detect_gpus(fake)
    assert [(g.index, g.name, g.uuid, g.compute_capability) for g in status.gpus] == [
        (0, "NVIDIA H200", "GPU-a", "9.0"), (1, "NVIDIA L4", "GPU-b", "8.9")]
    assert status.count == 2 and status.reason is None and fake.initialized == 0


def test_a_gpu_mostly_used_by_someone_else_gets_no_layers() -> None:
    busy = FakeGpu("NVIDIA H200", total=141 * GIB, used=141 * GIB - 64 * MIB, uuid="GPU-busy")
    hw = detect(nvml=FakeNvml([busy]))
    assert hw.gpu.gpus[0].memory_free_bytes == 64 * MIB
    assert tune_llm(hw, SMOL, gpu_offload_supported=True).gpu_layers == 0
    assert tune_llm(detect(nvml=FakeNvml([_h200()])), SMOL, gpu_offload_supported=True).gpu_layers > 0


@pytest.mark.parametrize("code", [FakeNvml.NVML_ERROR_NOT_SUPPORTED, FakeNvml.NVML_ERROR_NO_PERMISSION])
def test_refused_telemetry_is_none_and_the_gpu_is_still_listed(code: int) -> None:
    fake = FakeNvml([_h200(errors={q: code for q in TELEMETRY})])
    (gpu,) = detect_gpus(fake).gpus
    assert (gpu.temperature_c, gpu.power_draw_w, gpu.power_limit_w) == (None, None, None)
    assert (gpu.utilization_gpu_pct, gpu.utilization_memory_pct) == (None, None)
    assert gpu.memory_free_bytes == 140 * GIB and gpu.compute_capability == "9.0"
    assert fake.initialized == 0


def test_a_lost_gpu_is_left_out_with_a_reason_and_the_others_stay() -> None:
    lost = {"nvmlDeviceGetMemoryInfo": FakeNvml.NVML_ERROR_GPU_IS_LOST}
    fake = FakeNvml([_h200("GPU-ok"), _h200("GPU-gone", errors=lost)])
    status = detect_gpus(fake)
    assert [g.uuid for g in status.gpus] == ["GPU-ok"]
    assert status.reason is not None and "GPU 1" in status.reason and "GPU is lost" in status.reason
    assert fake.initialized == 0
    alone = FakeNvml([_h200(errors={"nvmlDeviceGetTemperature": FakeNvml.NVML_ERROR_GPU_IS_LOST})])
    status = detect_gpus(alone)  # lost between two queries: not a missing sensor, the GPU is gone
    assert status.gpus == () and "GPU 0" in (status.reason or "") and alone.initialized == 0


# -- /proc and /sys fixture trees --------------------------------------------------------------

def _epyc_in_a_2cpu_container(root: Path) -> Path:
    files = {
        "proc/cpuinfo": "processor\t: 0\nmodel name\t: AMD EPYC 9554 64-Core Processor\ncpu MHz\t\t: 1500.000\n"
                        "flags\t\t: sse4_2 avx avx2 fma avx512f",
        "sys/fs/cgroup/cpu.max": "200000 100000",
        "sys/fs/cgroup/memory.max": str(8 * GIB),
        "sys/fs/cgroup/memory.current": str(2 * GIB),
        "sys/devices/system/node/node0/cpulist": "0-31,64-95",
        "sys/devices/system/node/node1/cpulist": "32-63,96-127",
        "sys/devices/system/node/possible": "0-1",
        "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq": "3762000",
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": "2450123",
    }
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "1024K"), (3, "Unified", "32768K")]):
        files |= {f"sys/devices/system/cpu/cpu0/cache/index{i}/level": str(level),
                  f"sys/devices/system/cpu/cpu0/cache/index{i}/type": kind,
                  f"sys/devices/system/cpu/cpu0/cache/index{i}/size": size}
    return _write(root, files)


def test_a_64_core_host_inside_a_2_cpu_container(tmp_path: Path) -> None:
    hw = detect(root=_epyc_in_a_2cpu_container(tmp_path), nvml=NO_GPU)
    assert hw.cgroup.version == "v2" and hw.usable_cores == min(2, _real_cores())
    assert hw.usable_memory_bytes <= 6 * GIB
    cpu = hw.cpu
    assert cpu.model.startswith("AMD EPYC 9554") and "avx512f" in cpu.flags
    assert (cpu.numa_nodes, cpu.numa_cpulists) == (2, ("0-31,64-95", "32-63,96-127"))
    assert (cpu.freq_max_mhz, cpu.freq_current_mhz) == (3762.0, 2450.123)  # cpufreq wins over cpuinfo
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (1 * MIB, 32 * MIB)
    data = json.loads(json.dumps(hw.to_dict()))["cpu"]
    assert data["numa_cpulists"] == ["0-31,64-95", "32-63,96-127"] and data["l3_cache_bytes"] == 32 * MIB


def test_a_vm_without_cpufreq_numa_or_l3_falls_back_or_says_none(tmp_path: Path) -> None:
    _write(tmp_path, {
        "proc/cpuinfo": "model name\t: Intel Xeon Processor (Icelake)\ncpu MHz\t\t: 2593.906\n"
                        "processor\t: 1\ncpu MHz\t\t: 2600.000",
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq": "<unknown>",
        "sys/devices/system/cpu/cpu0/cache/index0/level": "1",
        "sys/devices/system/cpu/cpu0/cache/index0/size": "48K",
        "sys/devices/system/cpu/cpu0/cache/index1/level": "2",
        "sys/devices/system/cpu/cpu0/cache/index1/size": "2M",
        "sys/devices/system/cpu/cpu0/cache/index2/level": "3",
        "sys/devices/system/cpu/cpu0/cache/index2/size": "garbage",
    })
    cpu = detect(root=tmp_path, nvml=NO_GPU).cpu
    assert (cpu.freq_max_mhz, cpu.freq_current_mhz) == (None, 2593.906)
    assert (cpu.numa_nodes, cpu.numa_cpulists) == (None, ())
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (2 * MIB, None)


def test_numa_nodes_sort_by_number_and_an_empty_tree_never_raises(tmp_path: Path) -> None:
    nodes = {f"sys/devices/system/node/node{n}/cpulist": f"{n * 4}-{n * 4 + 3}" for n in range(12)}
    cpu = detect(root=_write(tmp_path / "big", nodes), nvml=NO_GPU).cpu
    assert cpu.numa_nodes == 12 and cpu.numa_cpulists[2] == "8-11" and cpu.numa_cpulists[10] == "40-43"
    empty = detect(root=tmp_path / "nothing-here", nvml=NO_GPU)
    assert (empty.cpu.numa_nodes, empty.cpu.freq_max_mhz, empty.cpu.freq_current_mhz, empty.cpu.l3_cache_bytes) == (
        None, None, None, None)
    assert empty.cgroup.version is None and empty.usable_cores >= 1
    json.dumps(empty.to_dict())


def test_cgroup_v1_quota_and_memory_limit_cap_what_is_usable(tmp_path: Path) -> None:
    _write(tmp_path, {
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000",
        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(1 * GIB),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(256 * MIB),
    })
    hw = detect(root=tmp_path, nvml=NO_GPU)
    assert hw.cgroup.version == "v1" and hw.usable_cores == 1
    assert hw.usable_memory_bytes <= 768 * MIB


# -- what `understudy hardware` prints ---------------------------------------------------------

def test_hardware_rows_show_each_gpu_and_a_dash_for_what_was_not_read(tmp_path: Path) -> None:
    fake = FakeNvml([_h200(temperature_c=55, power_mw=250_000),
                     FakeGpu("NVIDIA L4", total=24 * GIB, used=0, uuid="GPU-l4", errors=not_supported(*TELEMETRY))])
    hw = detect(root=_epyc_in_a_2cpu_container(tmp_path), nvml=fake)
    rows = hardware_rows(hw, EngineCaps(True, frozenset({"AVX2"}), ("CUDAExecutionProvider",)))
    assert all(len(r) == 2 and all(isinstance(c, str) for c in r) for r in rows)
    table = dict(rows)
    assert len(table) == len(rows)  # labels are unique
    assert "2 nodes" in table["NUMA"] and "32-63,96-127" in table["NUMA"]
    assert table["CPU MHz"] == "3762 max, 2450 now" and "L3 32 MiB" in table["CPU cache"]
    assert "NVIDIA H200" in table["GPU 0"] and "9.0" in table["GPU 0"] and "144384 MiB" in table["GPU 0"]
    assert "55 C" in table["GPU 0 load"] and "250" in table["GPU 0 load"] and "700 W" in table["GPU 0 load"]
    assert "NVIDIA L4" in table["GPU 1"] and table["GPU 1 load"].count("-") >= 3
    assert table["onnxruntime"] == "CUDAExecutionProvider" and "GPU offload yes" in table["llama.cpp build"]
    lost = FakeNvml([_h200(errors={"nvmlDeviceGetMemoryInfo": FakeNvml.NVML_ERROR_GPU_IS_LOST})])
    no_gpu = dict(hardware_rows(detect(root=tmp_path, nvml=lost), EngineCaps(False, frozenset(), ())))
    assert "GPU is lost" in no_gpu["GPUs"] and no_gpu["onnxruntime"] == "not installed"


def test_detection_is_fast_enough_for_understudy_hardware_json() -> None:
    import time

    start = time.perf_counter()
    hw = detect(nvml=NO_GPU)
    assert time.perf_counter() - start < 0.5
    assert hw.gpu.gpus == ()
