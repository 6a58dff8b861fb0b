"""Shared fixtures: a real Understudy server (subprocess, real models, real HTTP on loopback).

``server`` is one server for the whole session (embedded default catalog). ``start_server``
starts another one with a given TOML config for tests that need their own (corrupt model,
one slot, small queues...). Both wait for ``/ready`` (or for the loader to finish, when the test
expects a degraded catalog) and stop the process afterwards. ``cloud`` is a fake OpenAI cloud on
loopback (``scripts/fake_cloud.py``), one per test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from fake_cloud import FakeCloud  # noqa: E402
TEST_CACHE = ROOT / ".cache" / "test-state"
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "minilm-l6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    url: str
    process: subprocess.Popen[str]
    log_path: Path
    config_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        return httpx.get(self.url + "/admin/status", timeout=10).json()


def _wait(url: str, proc: subprocess.Popen[str], log_path: Path, want_ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            r = httpx.get(url + "/ready", timeout=2)
            body = r.json()
            if r.status_code == 200 or (not want_ready and body.get("status") != "loading"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text()}")


@contextmanager
def run_server(tmp: Path, config: str | None = None, want_ready: bool = True, env: dict[str, str] | None = None,
               timeout: float = 120.0) -> Iterator[ServerProc]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)]
    config_path = None
    text = config if config is not None else ""
    if "state_dir" not in text:
        # Trained classifier heads are cached by content hash, so every test server shares one
        # cache (the first server of a clean clone trains; the others load in milliseconds).
        settings = f'state_dir = "{tmp / "state"}"\ncache_dir = "{TEST_CACHE}"'
        text = f'[server]\n{settings}\n' + text if "[server]" not in text else text.replace("[server]", f'[server]\n{settings}', 1)
    config_path = tmp / "understudy.toml"
    config_path.write_text(text)
    args += ["--config", str(config_path)]
    log_path = tmp / "server.log"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("UNDERSTUDY_CONFIG", None)
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, log_path, want_ready, timeout)
        yield ServerProc(url, proc, log_path, config_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with run_server(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture
def start_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``with start_server(config_text) as srv:`` — a dedicated server for one test."""
    counter = iter(range(100))

    def _start(config: str = "", want_ready: bool = True, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return run_server(tmp_path / f"srv{next(counter)}", config, want_ready, env)

    return _start


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeCloud]:
    c = FakeCloud().start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def smol_path() -> Path:
    from models.catalog import default_catalog

    spec = default_catalog()[0]
    assert spec.path is not None and spec.path.exists(), "run `make setup` first"
    return spec.path
