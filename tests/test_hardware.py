"""Hardware detection on this machine, a fake cgroup tree, and NVML absent / faked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from hardware.detect import detect, read_cgroup
from hardware.nvml import detect_gpus
from hardware.tuning import LlmOverrides, LlmShape, ModelDoesNotFit, tune_llm
from tests.fake_nvml import FakeGpu, FakeNvml

GIB = 1024**3
SMOL = LlmShape(file_bytes=98_362_432, n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ctx_train=8192)


def test_detects_this_machine_with_sane_values() -> None:
    hw = detect()
    assert hw.cpu.logical_cores == psutil.cpu_count(logical=True)
    assert 1 <= hw.cpu.physical_cores <= hw.cpu.logical_cores
    assert 1 <= hw.usable_cores <= hw.cpu.logical_cores
    assert hw.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < hw.memory.available_bytes <= hw.memory.total_bytes
    assert hw.cpu.model and hw.cpu.arch
    if hw.cpu.arch == "x86_64":
        assert "avx" in hw.cpu.flags or "sse4_2" in hw.cpu.flags


def test_nvml_library_absent_is_reported_as_no_gpu() -> None:
    status = detect_gpus(FakeNvml([], library_missing=True))
    assert status.gpus == ()
    assert status.reason is not None and "Library Not Found" in status.reason


def test_real_pynvml_on_this_machine_never_raises() -> None:
    status = detect_gpus()  # the real module; without a driver it must say so, not crash
    assert status.gpus or status.reason


def test_fake_nvml_gpu_is_detected_with_memory_and_driver() -> None:
    fake = FakeNvml([FakeGpu("NVIDIA H200", total=141 * GIB, used=1 * GIB, uuid="GPU-1234")], name_as_bytes=True)
    status = detect_gpus(fake)
    assert status.reason is None
    assert status.driver_version == "580.65.06" and status.cuda_driver_version == "13.0"
    (gpu,) = status.gpus
    assert (gpu.name, gpu.memory_total_bytes, gpu.memory_free_bytes, gpu.compute_capability) == ("NVIDIA H200", 141 * GIB, 140 * GIB, "9.0")
    assert fake.initialized == 0  # nvmlShutdown was called


def test_cgroup_v2_limits_are_read(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "cpu.max").write_text("150000 100000\n")
    (cg / "memory.max").write_text(str(4 * GIB))
    (cg / "memory.current").write_text(str(1 * GIB))
    limits = read_cgroup(tmp_path)
    assert (limits.version, limits.cpu_quota_cores, limits.memory_limit_bytes) == ("v2", 1.5, 4 * GIB)
    hw = detect(root=tmp_path, nvml=FakeNvml([], library_missing=True))
    assert hw.usable_cores == 1
    assert hw.usable_memory_bytes <= 3 * GIB


def test_cgroup_v2_without_limits_and_v1(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "cpu.max").write_text("max 100000")
    (cg / "memory.max").write_text("max")
    assert read_cgroup(tmp_path).cpu_quota_cores is None
    assert read_cgroup(tmp_path).memory_limit_bytes is None
    v1 = tmp_path / "v1"
    (v1 / "sys/fs/cgroup/cpu").mkdir(parents=True)
    (v1 / "sys/fs/cgroup/memory").mkdir(parents=True)
    (v1 / "sys/fs/cgroup/cpu/cpu.cfs_quota_us").write_text("200000")
    (v1 / "sys/fs/cgroup/cpu/cpu.cfs_period_us").write_text("100000")
    (v1 / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(str(2**63 - 4096))
    limits = read_cgroup(v1)
    assert (limits.version, limits.cpu_quota_cores, limits.memory_limit_bytes) == ("v1", 2.0, None)


def test_no_cgroup_files_means_no_limits(tmp_path: Path) -> None:
    assert read_cgroup(tmp_path).version is None


def test_tuning_uses_the_detected_cores_and_refuses_a_model_that_cannot_fit() -> None:
    hw = detect(nvml=FakeNvml([], library_missing=True))
    t = tune_llm(hw, SMOL)
    assert t.threads == hw.usable_cores
    assert 4 <= t.slots <= 16 and t.gpu_layers == 0
    assert t.max_context <= t.kv_tokens
    huge = LlmShape(file_bytes=hw.usable_memory_bytes + GIB, n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ctx_train=8192)
    try:
        tune_llm(hw, huge)
    except ModelDoesNotFit as exc:
        assert "MiB" in str(exc) and "available" in str(exc)
    else:
        raise AssertionError("a model larger than RAM was accepted")


def test_kv_pool_shrinks_to_fit_but_an_explicit_size_is_refused(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "cpu.max").write_text("max 100000")
    (cg / "memory.max").write_text(str(400 * 1024 * 1024))
    hw = detect(root=tmp_path, nvml=FakeNvml([], library_missing=True))
    t = tune_llm(hw, SMOL)
    assert t.kv_tokens < 8 * 2048  # shrunk to fit 400 MiB
    try:
        tune_llm(hw, SMOL, LlmOverrides(kv_tokens=65536))
    except ModelDoesNotFit:
        pass
    else:
        raise AssertionError("an explicit KV size that cannot fit was accepted")


def test_gpu_offload_is_chosen_when_the_build_supports_it() -> None:
    fake = FakeNvml([FakeGpu("NVIDIA H200", total=141 * GIB, used=0, uuid="GPU-1")])
    hw = detect(nvml=fake)
    on = tune_llm(hw, SMOL, gpu_offload_supported=True)
    off = tune_llm(hw, SMOL, gpu_offload_supported=False)
    assert on.gpu_layers == SMOL.n_layer + 1 and on.slots == 32
    assert off.gpu_layers == 0


def test_hardware_cli_prints_a_table_and_json() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "hardware"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Cores" in out.stdout and "RAM" in out.stdout and "GPU" in out.stdout
    js = subprocess.run([sys.executable, "-m", "server", "hardware", "--json"], capture_output=True, text=True, timeout=60)
    data = json.loads(js.stdout)
    assert data["cpu"]["logical_cores"] == psutil.cpu_count(logical=True)
    assert "gpu" in data and "count" in data["gpu"]
    assert data["warnings"] == [] or all(isinstance(w, str) for w in data["warnings"])
    assert "llama_cpp" in data["engines"] and "providers" in data["engines"]["onnxruntime"]


# -- never a silent fallback --------------------------------------------------------------------

def _cpu_only_box(flags: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    hw = detect(nvml=FakeNvml([], library_missing=True))
    return replace(hw, cpu=replace(hw.cpu, flags=flags))


def test_a_gpu_that_the_builds_cannot_use_is_a_warning_never_silence() -> None:
    from hardware.fallbacks import EngineCaps, fallback_warnings

    hw = detect(nvml=FakeNvml([FakeGpu("NVIDIA L4", total=24 * GIB, used=0, uuid="GPU-9")]))
    cpu_only = EngineCaps(False, frozenset(), ("CPUExecutionProvider",))
    warnings = fallback_warnings(hw, cpu_only)
    assert len(warnings) == 2
    assert "NVIDIA L4" in warnings[0] and "cannot offload" in warnings[0] and "GGML_CUDA=on" in warnings[0]
    assert "onnxruntime" in warnings[1] and "CUDA execution provider" in warnings[1]
    cuda = EngineCaps(True, frozenset(), ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert fallback_warnings(hw, cuda) == []


def test_a_build_without_the_cpus_simd_is_a_warning() -> None:
    from hardware.fallbacks import EngineCaps, fallback_warnings, parse_system_info

    features = parse_system_info("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | FMA = 1 | AVX512 = 0 | OPENMP = 1 | ")
    assert features == frozenset({"SSE3", "AVX", "AVX2", "FMA", "OPENMP"})
    hw = _cpu_only_box(("avx", "avx2", "fma", "avx512f"))
    (warning,) = fallback_warnings(hw, EngineCaps(False, features, ("CPUExecutionProvider",)))
    assert "AVX512" in warning and "does not use it" in warning
    assert fallback_warnings(_cpu_only_box(("avx", "avx2", "fma")), EngineCaps(False, features, ())) == []
    assert fallback_warnings(hw, EngineCaps(False, frozenset(), ())) == []  # unknown build: nothing claimed


def test_this_machines_engines_match_its_cpu_and_the_server_says_so(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from hardware.fallbacks import fallback_warnings
    from models.capabilities import engine_caps

    caps = engine_caps()
    assert caps.llama_features and "CPUExecutionProvider" in caps.onnx_providers
    expected = fallback_warnings(detect(), caps)
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["warnings"] == expected
    info = httpx.get(server.url + "/admin/hardware").json()
    assert info["warnings"] == expected
    assert info["engines"]["llama_cpp"]["cpu_features"] == sorted(caps.llama_features)
    assert info["hardware"]["cpu"]["physical_cores"] >= 1
    assert info["models"]["smollm2-135m-instruct"]["settings"]["threads"] >= 1
