"""Benchmark ``understudy models pull`` against ``curl`` + ``sha256sum`` over loopback.

    .venv/bin/python scripts/bench_pull.py [--size-mb 100] [--rounds 3] [--json FILE]

The file is a real GGUF (the embedded SmolLM2-135M, 98 MB) padded with zeros to ``--size-mb`` MiB:
its header is the real one, so the pull's llama.cpp checks run for real (llama.cpp reads the
header and vocabulary only; the padding after the tensors is never looked at). It is served by
``RangeFileServer`` (below; the tests use it too) on 127.0.0.1 with ``sendfile``.

Each round, in a rotating order: ``curl -o FILE URL && sha256sum FILE``; ``fetch`` in this
process (the download itself: stream, hash, fsync, rename; no file checks); and the whole
command ``python -m server models pull URL --id ... --kind chat --sha256 ...`` in a subprocess
(interpreter start, imports, download, GGUF header + llama.cpp vocab-only check, catalog write).
Reports the medians and their ratios to curl + sha256sum, then an interruption at 50 %: the
bytes the server sent to finish the file (resume by a second command, and by the same command's
own retry).
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class RangeFileServer:
    """A loopback HTTP/1.1 file server for pull tests and benchmarks.

    ``files`` maps a URL path (``"model.gguf"``) to bytes or a file. Supports ``Range: bytes=N-``
    and ``bytes=N-M`` (206 with Content-Range; 416 past the end), ETag/Last-Modified and
    ``If-Range``, keep-alive, TCP_NODELAY. Faults on demand: ``cut_after = N`` makes the next
    response close the connection after N body bytes (once); ``ignore_range = True`` answers 200
    with the whole file to every range; ``status = 503`` answers every request with that status.
    ``sent`` counts the body bytes written, ``requests`` records (path, Range header, status).
    """

    def __init__(self, files: dict[str, bytes | Path]) -> None:
        self.files = dict(files)
        self.ignore_range = False
        self.cut_after: int | None = None
        self.status: int | None = None
        self.sent = 0
        self.requests: list[tuple[str, str | None, int]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                owner._answer(self, head=True)

            def do_GET(self) -> None:
                owner._answer(self, head=False)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> RangeFileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> RangeFileServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def _meta(self, body: bytes | Path) -> tuple[int, str, str]:
        if isinstance(body, Path):
            st = body.stat()
            size, tag, mtime = st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime
        else:
            size, tag, mtime = len(body), hashlib.sha256(body).hexdigest()[:16], 1_700_000_000.0
        return size, f'"{tag}"', email.utils.formatdate(mtime, usegmt=True)

    def _answer(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        name = h.path.lstrip("/").split("?", 1)[0]
        rng = h.headers.get("Range")
        body = self.files.get(name)
        if self.status is not None or body is None:
            status = self.status or 404
            self.requests.append((name, rng, status))
            message = b"no such file\n" if status == 404 else b"unavailable\n"
            h.send_response(status)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(message)))
            h.end_headers()
            if not head:
                h.wfile.write(message)
            return
        size, etag, modified = self._meta(body)
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if_range = h.headers.get("If-Range")
        if m and not self.ignore_range and (if_range is None or if_range in (etag, modified)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # bytes=-N: the last N
                start = max(0, size - int(m.group(2) or 0))
            status = 206
            if start >= size or start > end:
                self.requests.append((name, rng, 416))
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        self.requests.append((name, rng, status))
        length = end - start + 1
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.send_header("ETag", etag)
        h.send_header("Last-Modified", modified)
        if not self.ignore_range:
            h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if head:
            return
        with self._lock:
            cut, self.cut_after = self.cut_after, None
        limit = length if cut is None else min(length, cut)
        if isinstance(body, Path):
            with body.open("rb") as f:
                sent = h.connection.sendfile(f, start, limit) if limit else 0
        else:
            h.wfile.write(memoryview(body)[start:start + limit])
            sent = limit
        with self._lock:
            self.sent += sent
        if limit < length:
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_file(path: Path, size: int) -> str:
    """The embedded SmolLM2 GGUF padded with zeros to ``size`` bytes; returns its sha256."""
    from models.catalog import default_catalog

    src = default_catalog()[0].path
    if src is None or not src.exists():
        raise SystemExit("the embedded SmolLM2 GGUF is not installed: run `make setup`")
    if src.stat().st_size > size:
        raise SystemExit(f"--size-mb must be at least {src.stat().st_size / 2**20:.0f} MiB (the GGUF itself)")
    shutil.copyfile(src, path)
    with path.open("r+b") as f:
        f.truncate(size)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100, help="file size in MiB (default 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from server.models_pull import PullError, fetch, gguf_head

    if not shutil.which("curl") or not shutil.which("sha256sum"):
        raise SystemExit("needs curl and sha256sum")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    try:
        size = args.size_mb * 2**20
        source = tmp / "source.gguf"
        sha = make_file(source, size)
        times: dict[str, list[float]] = {"curl + sha256sum": [], "fetch (download+hash+fsync+rename)": [],
                                         "understudy models pull (whole command)": []}
        cfg = tmp / "understudy.toml"
        cfg.write_text(f'[server]\nstate_dir = "{tmp / "state"}"\nembedded_models = false\n')
        with RangeFileServer({"model.gguf": source}) as srv:
            url = srv.url("model.gguf")
            out = tmp / "out"
            out.mkdir()

            def curl() -> None:
                target = out / "curl.gguf"
                subprocess.run(["curl", "-sS", "--fail", "-o", str(target), url], check=True)
                got = subprocess.run(["sha256sum", str(target)], check=True, capture_output=True, text=True).stdout.split()[0]
                assert got == sha, got
                target.unlink()

            def pull_fetch() -> None:
                target = out / "fetch" / "model.gguf"
                fetch(url, target, sha, head_check=gguf_head, progress=False, retries=0)
                shutil.rmtree(target.parent)

            counter = iter(range(1000))

            def pull_cli() -> None:
                model_id = f"bench-{next(counter)}"
                subprocess.run([sys.executable, "-m", "server", "models", "pull", url, "--id", model_id, "--kind", "chat",
                                "--sha256", sha, "--config", str(cfg), "--no-progress"], check=True, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                shutil.rmtree(tmp / "state")

            runners = list(zip(times, (curl, pull_fetch, pull_cli)))
            for r in range(args.rounds):
                order = runners[r % 3:] + runners[:r % 3]
                for name, fn in order:
                    times[name].append(timed(fn))
                    print(f"round {r + 1}: {name}: {times[name][-1]:.3f} s", file=sys.stderr)
            # Interrupted at 50 %: a second command resumes (fetch with retries=0, twice) ...
            half = size // 2
            target = out / "resume" / "model.gguf"
            srv.sent, srv.cut_after = 0, half
            try:
                fetch(url, target, sha, progress=False, retries=0)
                raise SystemExit("the cut did not interrupt the download")
            except PullError:
                pass
            first = srv.sent
            srv.sent = 0
            resumed = fetch(url, target, sha, progress=False, retries=0)
            second = srv.sent
            shutil.rmtree(target.parent)
            # ... and the same command's own retry resumes.
            srv.sent, srv.cut_after = 0, half
            auto = fetch(url, target, sha, progress=False, retries=3, retry_delay=0)
            auto_sent = srv.sent
        base = statistics.median(times["curl + sha256sum"])
        result = {
            "cpu": cpu_name(), "cores": os.cpu_count(), "size_bytes": size, "rounds": args.rounds,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "runs_s": times,
            "ratio_to_curl_sha256sum": {k: statistics.median(v) / base for k, v in times.items()},
            "interrupt_at_50pct": {
                "sent_before_cut": first, "resumed_from": resumed.resumed_from, "sent_to_finish": second,
                "redownloaded_bytes": first + second - size,
                "auto_retry_total_sent": auto_sent, "auto_retry_redownloaded_bytes": auto_sent - size,
                "auto_retry_resumed_from": auto.resumed_from,
            },
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{result['cpu']}, {result['cores']} cores; {size / 2**20:.0f} MiB over loopback, {args.rounds} rounds interleaved")
    for name, t in result["median_s"].items():
        print(f"  {name:<42} median {t:6.3f} s  ({size / t / 1e6:5.0f} MB/s)  {result['ratio_to_curl_sha256sum'][name]:.2f}x")
    i = result["interrupt_at_50pct"]
    print(f"  interrupted at 50 % ({i['sent_before_cut']} bytes sent): the next command resumed at {i['resumed_from']}, "
          f"the server sent {i['sent_to_finish']} more; re-downloaded {i['redownloaded_bytes']} bytes")
    print(f"  same, resumed by the command's own retry: {i['auto_retry_total_sent']} bytes sent in all, "
          f"re-downloaded {i['auto_retry_redownloaded_bytes']} bytes")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
