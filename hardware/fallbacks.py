"""Never a silent fallback: what the installed engines cannot use of this machine, said out loud.

Pure: ``fallback_warnings(hardware, engines)`` compares the detected hardware
(``hardware.detect``) with what the installed engines were built to use (``EngineCaps``, read by
``models.capabilities.engine_caps`` from llama.cpp's ``llama_print_system_info()`` and
onnxruntime's execution providers). Called once at start by ``server.app`` (each warning is
logged and shown in ``/ready``, ``/admin/hardware``) and by ``understudy hardware``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hardware.detect import HardwareInfo

#: CPU flag (``/proc/cpuinfo``) -> the name llama.cpp's system info gives the same instructions.
_SIMD = (("avx512f", "AVX512"), ("avx2", "AVX2"), ("avx_vnni", "AVX_VNNI"), ("avx512_vnni", "AVX512_VNNI"))
CUDA_BUILD_HINT = "make setup LLAMA_EXTRA_CMAKE_ARGS=-DGGML_CUDA=on (with the CUDA toolkit installed)"


@dataclass(frozen=True)
class EngineCaps:
    llama_gpu_offload: bool
    llama_features: frozenset[str]
    """What llama.cpp's CPU backend was built with (``AVX2``, ``AVX512``...); empty if unknown."""
    onnx_providers: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"llama_cpp": {"gpu_offload": self.llama_gpu_offload, "cpu_features": sorted(self.llama_features)},
                "onnxruntime": {"providers": list(self.onnx_providers)}}


def parse_system_info(text: str) -> frozenset[str]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | ..."`` -> the features set to 1."""
    out = set()
    for part in text.replace("\n", "|").split("|"):
        if "=" not in part:
            continue
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if value.strip() == "1" and name:
            out.add(name)
    return frozenset(out)


def fallback_warnings(hw: HardwareInfo, caps: EngineCaps) -> list[str]:
    """One sentence per capability of this machine that the engines will not use."""
    out: list[str] = []
    if hw.gpu.gpus:
        names = ", ".join(g.name for g in hw.gpu.gpus)
        if not caps.llama_gpu_offload:
            out.append(f"GPU present ({names}) but this llama.cpp build cannot offload: chat models run on the CPU. "
                       f"Rebuild with {CUDA_BUILD_HINT}.")
        if "CUDAExecutionProvider" not in caps.onnx_providers:
            out.append(f"GPU present ({names}) but onnxruntime has no CUDA execution provider "
                       f"({', '.join(caps.onnx_providers) or 'none'}): embedding and triage models run on the CPU "
                       "(install onnxruntime-gpu to use it).")
    if caps.llama_features:
        flags = set(hw.cpu.flags)
        missing = [name for flag, name in _SIMD if flag in flags and name not in caps.llama_features]
        if missing:
            out.append(f"The CPU has {', '.join(missing)} but this llama.cpp build does not use "
                       f"{'it' if len(missing) == 1 else 'them'}: chat models run slower than they could. Rebuild "
                       "with `make clean-venv setup` on this machine (the build flags follow /proc/cpuinfo).")
    return out
