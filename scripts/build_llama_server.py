#!/usr/bin/env python3
"""Build llama.cpp's own ``llama-server`` (and ``llama-bench``, ``llama-batched-bench``) once,
from the llama.cpp sources vendored in the llama-cpp-python sdist that ``make setup`` downloaded,
with the same CPU flags as the llama-cpp-python wheel (``scripts/llama_cmake_args.py``), so the
comparison in ``scripts/bench_serving.py`` runs identical kernels.

The binaries are cached in ``~/.cache/understudy/llama.cpp-<key>/bin`` (``--cache-dir`` to move
it), keyed by version and flags; a second call returns at once. Static libraries keep the binary
movable. Takes 10-15 minutes on 2 cores the first time.

    python scripts/build_llama_server.py            # prints the bin folder
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llama_cmake_args import cmake_args  # noqa: E402

VERSION = "0.3.36"
TARGETS = ["llama-server", "llama-bench", "llama-batched-bench"]


def build(cache_dir: Path, jobs: int) -> Path:
    import platform

    flags = cmake_args(platform.machine(), Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    key = hashlib.sha256(f"{VERSION} {flags}".encode()).hexdigest()[:16]
    root = cache_dir / f"llama.cpp-{key}"
    bindir = root / "build" / "bin"
    if all((bindir / t).exists() for t in TARGETS):
        return bindir
    sdist = cache_dir / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        raise SystemExit(f"{sdist} is missing: run `make setup` first")
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    configure = [
        "cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
        *flags.split(),
    ]
    print("+", " ".join(configure), file=sys.stderr)
    subprocess.run(configure, check=True, stdout=sys.stderr)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", str(jobs), "--target", *TARGETS], check=True, stdout=sys.stderr)
    return bindir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("UNDERSTUDY_CACHE", Path.home() / ".cache/understudy")))
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    print(build(args.cache_dir, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
