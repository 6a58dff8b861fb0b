#!/usr/bin/env python3
"""Print the CMAKE_ARGS that build llama.cpp for the CPU features the kernel says are usable.

Why not ``-DGGML_NATIVE=ON`` (llama.cpp's default)? Two reasons seen on this project's machines:
- ``-march=native`` turns on AMX where the CPU has it, and ggml's AMX matmul then dies with
  SIGILL on the first ``llama_decode`` (a standalone AMX program runs on the same VM, so the
  fault is ggml's tile set-up, not the machine). AMX is therefore always off.
- A natively built wheel cached on one machine is wrong on the next. The flags printed here
  also name the wheel's cache folder (see the Makefile), so a different CPU gets its own build.
Every other x86 extension is turned on exactly when ``/proc/cpuinfo`` lists it.

Used by the Makefile (``make setup``) for llama-cpp-python and by ``scripts/bench_serving.py``
for the llama-server it compares against, so both run the same kernels. Stdlib only.
Extra arguments (a CUDA build: ``-DGGML_CUDA=on``) come from the ``LLAMA_EXTRA_CMAKE_ARGS``
environment variable.
"""

from __future__ import annotations

import os
import platform
import sys

# /proc/cpuinfo flag -> ggml CMake option
_X86_OPTIONS: list[tuple[str, str | None]] = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("bmi2", "GGML_BMI2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
]
_ALWAYS_OFF = ["GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"]


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cmake_args(machine: str, cpuinfo: str, extra: str = "") -> str:
    args = []
    if machine in ("x86_64", "AMD64", "i686"):
        flags = cpu_flags(cpuinfo)
        args.append("-DGGML_NATIVE=OFF")
        args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in _X86_OPTIONS if option]
        args += [f"-D{option}=OFF" for option in _ALWAYS_OFF]
    if extra:
        args.append(extra)
    return " ".join(args)


def main() -> int:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    print(cmake_args(platform.machine(), info, os.environ.get("LLAMA_EXTRA_CMAKE_ARGS", "").strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
