#!/usr/bin/env python3
"""Serving benchmark: concurrent streaming chat, embeddings, and a burst, side by side.

    .venv/bin/python scripts/bench_serving.py                  # Understudy alone, levels 1,2,4,8,16
    .venv/bin/python scripts/bench_serving.py --compare        # + llama-cpp-python's server + llama.cpp's llama-server
    .venv/bin/python scripts/bench_serving.py --embeddings     # embeddings/s vs raw onnxruntime at batch 32
    .venv/bin/python scripts/bench_serving.py --triage         # /v1/triage classifications/s vs raw onnxruntime at batch 32
    .venv/bin/python scripts/bench_serving.py --burst 200      # 200 requests at once: answered or 429/503 + Retry-After
    .venv/bin/python scripts/bench_serving.py --url http://127.0.0.1:8080   # an already running server

Chat mode: closed-loop clients, each sending streaming chat requests (greedy, ``--max-tokens``)
back to back for ``--duration`` seconds per concurrency level. Per level: aggregate completion
tok/s, requests completed (and cut short), TTFT p50/p95, inter-token latency p50/p95 (per request:
(last token - first token) / (tokens - 1)), end-to-end p50/p95. Tokens are the server's
``usage.completion_tokens`` when it reports it, else one per content event.

With ``--compare`` the same load runs, in the same run, one server at a time and interleaved
(each level against each server in turn, ``--reps`` times), against
(a) ``python -m llama_cpp.server`` (``--interrupt_requests False``: with its default a new request
cuts the running stream) and (b) llama.cpp's ``llama-server --parallel <slots>``, built once from
the llama.cpp sources in the llama-cpp-python sdist (``scripts/build_llama_server.py``), all on the
same GGUF file, threads and context, and prints one table with ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from loadgen import Connection, Reply  # noqa: E402

PROMPTS = [
    "Write a detailed story about a night nurse on a busy hospital ward.",
    "Explain in detail how the heart pumps blood through the body.",
    "Describe, step by step, how to plan a week of healthy meals.",
    "Write a long letter from a doctor to a new medical student.",
    "Tell a long story about a lighthouse keeper and a storm.",
    "Explain in detail why sleep matters for health.",
    "Write a detailed guide to caring for houseplants.",
    "Describe a busy day in an emergency department, in detail.",
]
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_TEXTS = [
    "Patient reports chest pain radiating to the left arm.",
    "Fever of 39 degrees for three days with a dry cough.",
    "Follow-up visit after knee replacement, wound healing well.",
    "Shortness of breath on exertion, history of heart failure.",
    "Routine blood test results within normal limits.",
    "Allergic reaction to penicillin, rash on both arms.",
    "Headache and blurred vision since this morning.",
    "Discharged home with oral antibiotics for seven days.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[max(0, min(len(values) - 1, int(round(q / 100 * (len(values) - 1)))))]


@dataclass
class Level:
    concurrency: int
    replies: list[Reply] = field(default_factory=list)
    wall: float = 0.0
    loop_cpu: float = float("nan")
    """CPU seconds of the server's main thread (Understudy's event loop) during the level."""

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.status == 200 and not r.error_event and r.token_times]

    @property
    def tok_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall if self.wall else 0.0

    def summary(self, max_tokens: int) -> dict[str, Any]:
        ok = self.ok
        ttft = [r.ttft for r in ok if r.ttft is not None]
        itl = [r.itl for r in ok if r.itl is not None]
        e2e = [r.ended - r.started for r in ok]
        short = sum(1 for r in ok if r.completion_tokens < max_tokens and r.finish_reason != "stop")
        tokens = sum(r.completion_tokens for r in ok)
        return {
            "c": self.concurrency, "sent": len(self.replies), "done": len(ok), "short": short,
            "failed": len(self.replies) - len(ok), "tok_s": self.tok_s,
            "loop_ms_tok": self.loop_cpu * 1000 / tokens if tokens else float("nan"),
            "loop_ms_req": self.loop_cpu * 1000 / len(ok) if ok else float("nan"),
            "ttft50": pct(ttft, 50), "ttft95": pct(ttft, 95), "itl50": pct(itl, 50), "itl95": pct(itl, 95),
            "e2e50": pct(e2e, 50), "e2e95": pct(e2e, 95),
        }


# -- servers -------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    url: str
    model: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    ready_s: float = 0.0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def main_thread_cpu(self) -> float:
        """CPU seconds used so far by Understudy's main thread (its thread id is its pid: the event
        loop). NaN for another server (llama-server's main thread decodes: not comparable) and for
        a server that is not a process of ours."""
        if self.process is None or not self.name.startswith("understudy"):
            return float("nan")
        try:
            for t in psutil.Process(self.process.pid).threads():
                if t.id == self.process.pid:
                    return t.user_time + t.system_time
        except psutil.Error:
            pass
        return float("nan")

    def rss_mb(self) -> float:
        if self.process is None:
            return float("nan")
        try:
            proc = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
        except psutil.Error:
            return float("nan")


def _wait_ready(server: Server, path: str, timeout: float = 180.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.process is not None and server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited; log: {server.log}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{server.name} not ready after {timeout} s; log: {server.log}")


def _spawn(name: str, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, log


def launch_understudy(tmp: Path, config_text: str = "", state_dir: Path | None = None, name: str = "understudy") -> Server:
    """Start ``understudy serve`` with ``config_text`` (a ``[server]`` table is added) and wait for /ready."""
    port = free_port()
    config = tmp / f"{name}.toml"
    # Trained classifier heads are cached by content hash: scripts share one cache, so only the
    # first run on a machine trains.
    config.write_text(f'[server]\nlog_level = "warning"\nstate_dir = "{state_dir or tmp / "state"}"\n'
                      f'cache_dir = "{ROOT / ".cache" / "scripts"}"\n{config_text}')
    proc, log = _spawn(name, [sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port)], tmp)
    server = Server(name, f"http://127.0.0.1:{port}", CHAT_MODEL, proc, log)
    server.ready_s = _wait_ready(server, "/ready")
    return server


def start_understudy(tmp: Path, slots: int, ctx_per_slot: int, threads: int, extra: str = "") -> Server:
    return launch_understudy(tmp, f"""
[models.{CHAT_MODEL}]
slots = {slots}
kv_tokens = {slots * ctx_per_slot}
threads = {threads}
{extra}
""")


def start_llama_cpp_python(tmp: Path, gguf: Path, ctx: int, threads: int) -> Server:
    port = free_port()
    proc, log = _spawn("llama-cpp-python", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", CHAT_MODEL, "--port", str(port),
        "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False",
    ], tmp)
    server = Server("llama-cpp-python server", f"http://127.0.0.1:{port}", CHAT_MODEL, proc, log)
    server.ready_s = _wait_ready(server, "/v1/models")
    return server


def start_llama_server(tmp: Path, gguf: Path, slots: int, ctx_per_slot: int, threads: int) -> Server:
    from build_llama_server import build

    bindir = build(Path(os.environ.get("UNDERSTUDY_CACHE", Path.home() / ".cache/understudy")), os.cpu_count() or 2)
    port = free_port()
    proc, log = _spawn("llama-server", [
        str(bindir / "llama-server"), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
        "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--alias", CHAT_MODEL, "--no-webui",
    ], tmp)
    server = Server("llama-server (C++)", f"http://127.0.0.1:{port}", CHAT_MODEL, proc, log)
    server.ready_s = _wait_ready(server, "/health")
    return server


# -- chat load -----------------------------------------------------------------------------------

async def run_level(server: Server, concurrency: int, duration: float, max_tokens: int, warmup: bool = True) -> Level:
    u = urlparse(server.url)
    level = Level(concurrency)

    def body(i: int) -> dict[str, Any]:
        return {"model": server.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}

    async def client(k: int, stop_at: float) -> None:
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        i = k
        try:
            while time.perf_counter() < stop_at:
                level.replies.append(await conn.request("POST", "/v1/chat/completions", body(i)))
                i += concurrency
        finally:
            await conn.close()

    if warmup:
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        await conn.request("POST", "/v1/chat/completions", body(0))
        await conn.close()
    cpu0 = server.main_thread_cpu()
    start = time.perf_counter()
    await asyncio.gather(*[client(k, start + duration) for k in range(concurrency)])
    level.wall = time.perf_counter() - start
    level.loop_cpu = server.main_thread_cpu() - cpu0
    return level


def print_levels(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{name}")
    print(f"  {'conc':>4} {'done':>5} {'short':>5} {'fail':>4} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} "
          f"{'E2E p50':>8} {'p95':>7} {'event-loop CPU ms/token':>24} {'ms/request':>11}")
    for r in rows:
        print(f"  {r['c']:>4} {r['done']:>5} {r['short']:>5} {r['failed']:>4} {r['tok_s']:>7.1f} {r['ttft50']:>8.3f}s {r['ttft95']:>6.3f}s "
              f"{r['itl50'] * 1000:>6.1f}ms {r['itl95'] * 1000:>5.1f}ms {r['e2e50']:>7.2f}s {r['e2e95']:>6.2f}s "
              f"{r['loop_ms_tok']:>24.3f} {r['loop_ms_req']:>11.2f}")


def print_comparison(results: dict[str, list[dict[str, Any]]]) -> None:
    ours = results.get("understudy")
    if not ours:
        return
    others = [k for k in results if k != "understudy"]
    print("\nSide by side (ratios are Understudy / other; > 1 is better for tok/s, < 1 is better for TTFT)")
    head = f"  {'conc':>4} {'Understudy tok/s':>16} {'TTFT p50':>9}"
    for o in others:
        head += f" | {o[:24]:>24} {'tok/s':>7} {'TTFT':>7} {'x tok/s':>7} {'x TTFT':>7}"
    print(head)
    for i, row in enumerate(ours):
        line = f"  {row['c']:>4} {row['tok_s']:>16.1f} {row['ttft50']:>8.3f}s"
        for o in others:
            r = results[o][i]
            line += f" | {'':>24} {r['tok_s']:>7.1f} {r['ttft50']:>6.3f}s {row['tok_s'] / r['tok_s'] if r['tok_s'] else float('inf'):>6.2f}x {row['ttft50'] / r['ttft50'] if r['ttft50'] else float('nan'):>6.2f}x"
        print(line)


# -- embeddings ----------------------------------------------------------------------------------

def raw_onnx_throughput(batch: int, seconds: float, threads: int) -> float:
    from models.catalog import default_catalog
    from models.onnx_runner import OnnxEmbedder

    spec = next(s for s in default_catalog() if s.id == "minilm-l6-v2")
    assert spec.path is not None and spec.tokenizer_path is not None
    embedder = OnnxEmbedder(spec.path, spec.tokenizer_path, threads, 256)
    ids = embedder.tokenize(EMBED_TEXTS)
    work = [ids[i % len(ids)] for i in range(batch)]
    embedder.embed(work)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        embedder.embed(work)
        n += batch
    return n / (time.perf_counter() - t0)


async def embed_level(server: Server, concurrency: int, duration: float, path: str = "/v1/embeddings",
                      model: str = "minilm-l6-v2", latencies: list[float] | None = None) -> tuple[float, int, int]:
    """Closed-loop single-input requests to ``path`` (embeddings or triage): (rate, ok, failed)."""
    u = urlparse(server.url)
    done = failed = 0

    async def client(k: int, stop_at: float) -> None:
        nonlocal done, failed
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        i = k
        try:
            while time.perf_counter() < stop_at:
                r = await conn.request("POST", path, {"model": model, "input": EMBED_TEXTS[i % len(EMBED_TEXTS)]})
                if r.status == 200:
                    done += 1
                    if latencies is not None:
                        latencies.append(r.ended - r.started)
                else:
                    failed += 1
                i += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*[client(k, start + duration) for k in range(concurrency)])
    return done / (time.perf_counter() - start), done, failed


def embeddings_bench(server: Server, duration: float, threads: int) -> None:
    print("\nEmbeddings (minilm-l6-v2, single-input requests) against the raw engine", flush=True)
    status = httpx.get(server.url + "/admin/status").json()["models"]["minilm-l6-v2"]["engine"]
    before = dict(status)
    rows = []
    for c in (1, 8, 32):
        rate, done, failed = asyncio.run(embed_level(server, c, duration))
        rows.append((c, rate, done, failed))
        print(f"  c={c}: {rate:.1f} embeddings/s ({done} ok, {failed} failed)", flush=True)
    after = httpx.get(server.url + "/admin/status").json()["models"]["minilm-l6-v2"]["engine"]
    batches = after["batches"] - before["batches"]
    inputs = after["batched_inputs"] - before["batched_inputs"]
    raw1 = raw_onnx_throughput(1, duration / 2, threads)
    raw32 = raw_onnx_throughput(32, duration / 2, threads)
    print(f"  raw onnxruntime, same texts, {threads} threads: batch 1 {raw1:.1f}/s, batch 32 {raw32:.1f}/s (the engine's limit)")
    print(f"  server batches: {batches} batches for {inputs} inputs (mean {inputs / max(1, batches):.1f}, max {after['max_batch']})")
    print(f"  {'conc':>4} {'emb/s':>8} {'x raw batch-32':>15}")
    for c, rate, _, _ in rows:
        print(f"  {c:>4} {rate:>8.1f} {rate / raw32:>14.2f}x")


def triage_bench(server: Server, duration: float, threads: int, reps: int = 3) -> None:
    """``/v1/triage`` (single-input) against raw onnxruntime at batch 32 on the same texts,
    interleaved: raw, c=1, c=8, c=32, ``reps`` times, so the machine's drifts hit both alike."""
    print("\nTriage (triage-minilm over minilm-l6-v2, single-input /v1/triage requests) against the raw engine", flush=True)
    raw: list[float] = []
    rows: dict[int, list[tuple[float, int, int]]] = {1: [], 8: [], 32: []}
    lat: dict[int, list[float]] = {1: [], 8: [], 32: []}
    before = httpx.get(server.url + "/admin/status").json()["models"]["minilm-l6-v2"]["engine"]
    for _ in range(reps):
        raw.append(raw_onnx_throughput(32, duration / 2, threads))
        for c in rows:
            rows[c].append(asyncio.run(embed_level(server, c, duration / reps, "/v1/triage", "triage-minilm", lat[c])))
    after = httpx.get(server.url + "/admin/status").json()["models"]["minilm-l6-v2"]["engine"]
    batches = after["batches"] - before["batches"]
    inputs = after["batched_inputs"] - before["batched_inputs"]
    raw32 = sum(raw) / len(raw)
    print(f"  raw onnxruntime batch 32, same texts, {threads} threads: {raw32:.1f}/s (runs: {', '.join(f'{r:.0f}' for r in raw)})")
    print(f"  embedding batches: {batches} for {inputs} inputs (mean {inputs / max(1, batches):.1f}, max {after['max_batch']})")
    print(f"  {'conc':>4} {'triage/s':>9} {'x raw batch-32':>15} {'p50 ms':>7} {'p95 ms':>7} {'failed':>6}")
    for c, runs in rows.items():
        done = sum(r[1] for r in runs)
        rate = sum(r[0] for r in runs) / len(runs)
        failed = sum(r[2] for r in runs)
        print(f"  {c:>4} {rate:>9.1f} {rate / raw32:>14.2f}x {pct(lat[c], 50) * 1000:>7.1f} {pct(lat[c], 95) * 1000:>7.1f} {failed:>6}"
              + ("" if done else "  (no request completed)"))


# -- burst ---------------------------------------------------------------------------------------

async def burst(server: Server, n: int, max_tokens: int) -> None:
    u = urlparse(server.url)
    rss_idle = server.rss_mb()
    peak = rss_idle
    stop = False

    async def sample() -> None:
        nonlocal peak
        while not stop:
            peak = max(peak, server.rss_mb())
            await asyncio.sleep(0.05)

    async def one(i: int) -> Reply:
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        try:
            return await conn.request("POST", "/v1/chat/completions", {
                "model": server.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True})
        finally:
            await conn.close()

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    replies = await asyncio.gather(*[one(i) for i in range(n)])
    wall = time.perf_counter() - t0
    stop = True
    await sampler
    full = sum(1 for r in replies if r.status == 200 and not r.error_event and r.token_times)
    by_status: dict[str, int] = {}
    for r in replies:
        if r.status != 200:
            key = f"{r.status}{' + Retry-After' if 'retry-after' in r.headers else ' WITHOUT Retry-After'}"
            by_status[key] = by_status.get(key, 0) + 1
    other = n - full - sum(v for k, v in by_status.items() if "+ Retry-After" in k and k[:3] in ("429", "503"))
    print(f"\nBurst of {n} concurrent streaming requests (max_tokens {max_tokens}) in {wall:.1f} s")
    print(f"  full answers: {full}; refused: {by_status or 'none'}; anything else: {other}")
    print(f"  RSS: {rss_idle:.0f} MB before, {peak:.0f} MB peak during the burst")


# -- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark this running server instead of starting Understudy")
    parser.add_argument("--compare", action="store_true", help="also run llama-cpp-python's server and llama-server")
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level and server")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds per level (the duration is split)")
    parser.add_argument("--ceiling", action="store_true", help="print llama-batched-bench's decode ceiling (built on demand)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 2)
    parser.add_argument("--embeddings", action="store_true", help="embeddings mode")
    parser.add_argument("--triage", action="store_true", help="/v1/triage at 1/8/32 clients against raw onnxruntime batch 32")
    parser.add_argument("--burst", type=int, default=0, help="send this many requests at once (e.g. 200)")
    parser.add_argument("--only", default="", help="with --compare: comma list of understudy,llama-cpp-python,llama-server")
    args = parser.parse_args()

    from models.catalog import default_catalog

    gguf = default_catalog()[0].path
    assert gguf is not None, "run `make setup` first"
    levels = [int(x) for x in args.levels.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="understudy-bench-"))
    print(f"model {gguf.name}, {args.threads} threads, {args.slots} slots x {args.ctx_per_slot} tokens, "
          f"max_tokens {args.max_tokens}, {args.duration:g} s per level; logs in {tmp}", flush=True)

    if args.url:
        server = Server("server", args.url.rstrip("/"), CHAT_MODEL)
        if args.embeddings:
            embeddings_bench(server, args.duration, args.threads)
        elif args.triage:
            triage_bench(server, args.duration, args.threads)
        elif args.burst:
            asyncio.run(burst(server, args.burst, args.max_tokens))
        else:
            rows = [asyncio.run(run_level(server, c, args.duration, args.max_tokens)).summary(args.max_tokens) for c in levels]
            print_levels(server.url, rows)
        return 0

    if args.embeddings or args.burst or args.triage:
        server = start_understudy(tmp, args.slots, args.ctx_per_slot, args.threads)
        try:
            print(f"Understudy ready in {server.ready_s:.2f} s, RSS {server.rss_mb():.0f} MB")
            if args.embeddings:
                embeddings_bench(server, args.duration, args.threads)
            if args.triage:
                triage_bench(server, args.duration, args.threads)
            if args.burst:
                asyncio.run(burst(server, args.burst, args.max_tokens))
        finally:
            server.stop()
        return 0

    wanted = args.only.split(",") if args.only else ["understudy", "llama-cpp-python", "llama-server"]
    if not args.compare:
        wanted = ["understudy"]
    servers: dict[str, Server] = {}
    try:
        for which in wanted:  # all started up front; an idle server costs no CPU
            if which == "understudy":
                servers[which] = start_understudy(tmp, args.slots, args.ctx_per_slot, args.threads)
            elif which == "llama-cpp-python":
                servers[which] = start_llama_cpp_python(tmp, gguf, args.ctx_per_slot, args.threads)
            else:
                servers[which] = start_llama_server(tmp, gguf, args.slots, args.ctx_per_slot, args.threads)
            s = servers[which]
            print(f"{s.name}: ready in {s.ready_s:.2f} s, RSS {s.rss_mb():.0f} MB", flush=True)
        # Interleaved: each level runs against every server in turn, ``--reps`` rounds, the order
        # reversed every other round, so that this shared machine's drifts hit them all alike.
        # Each round gives its own ratios; the report quotes their median.
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
        rounds: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in servers}
        engine: list[dict[str, float]] = []
        order = list(servers)
        for c in levels:
            merged: dict[str, Level] = {k: Level(c, loop_cpu=0.0) for k in servers}
            per_round: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
            steps = [0.0, 0.0, 0.0]  # engine steps, busy s, decode s (Understudy)
            for rep in range(args.reps):
                for which in (order if rep % 2 == 0 else order[::-1]):
                    before = engine_status(servers[which]) if which == "understudy" else None
                    level = asyncio.run(run_level(servers[which], c, args.duration / args.reps, args.max_tokens))
                    if before is not None:
                        after = engine_status(servers[which])
                        for i, key in enumerate(("steps", "busy_s", "decode_s")):
                            steps[i] += after.get(key, 0) - before.get(key, 0)
                    per_round[which].append(level.summary(args.max_tokens))
                    merged[which].replies += level.replies
                    merged[which].wall += level.wall
                    merged[which].loop_cpu += level.loop_cpu
            for which in order:
                row = merged[which].summary(args.max_tokens)
                results[which].append(row)
                rounds[which].append(per_round[which])
                loop = f", event loop {row['loop_ms_tok']:.3f} ms CPU/token" if which == "understudy" else ""
                print(f"  c={c:<3} {servers[which].name:<24} {row['tok_s']:7.1f} tok/s, {row['done']} done, "
                      f"TTFT p50 {row['ttft50']:.3f} s{loop}", flush=True)
            if "understudy" in servers and steps[0]:
                engine.append({"c": c, "steps": steps[0], "python_ms": (steps[1] - steps[2]) * 1000 / steps[0],
                               "decode_ms": steps[2] * 1000 / steps[0], "busy": steps[1]})
    finally:
        for s in servers.values():
            s.stop()
    for which, rows in results.items():
        print_levels(servers[which].name, rows)
    if engine:
        print("\nUnderstudy's engine thread, per step (one llama_decode for every running sequence)")
        print(f"  {'conc':>4} {'steps':>7} {'decode ms':>10} {'Python ms between decodes':>26}")
        for e in engine:
            print(f"  {e['c']:>4} {e['steps']:>7.0f} {e['decode_ms']:>10.2f} {e['python_ms']:>26.3f}")
    names = {k: (servers[k].name if k != "understudy" else k) for k in results}
    print_comparison({names[k]: v for k, v in results.items()})
    print_round_ratios({names[k]: v for k, v in rounds.items()})
    if "llama-server" in servers or args.ceiling:
        print_ceiling(gguf, levels, args.threads, args.max_tokens)
    return 0


def engine_status(server: Server) -> dict[str, Any]:
    try:
        models = httpx.get(server.url + "/admin/status", timeout=5).json()["models"]
        return models[CHAT_MODEL]["engine"] or {}
    except (httpx.HTTPError, KeyError, ValueError):
        return {}


def print_round_ratios(rounds: dict[str, list[list[dict[str, Any]]]]) -> None:
    """Understudy / other, per round, and the median over rounds (the figure the targets use)."""
    ours = rounds.get("understudy")
    if not ours or len(ours[0]) < 2:
        return
    print("\nPer-round ratios, Understudy / other (median over rounds; tok/s > 1 and TTFT < 1 favour Understudy)")
    for other, levels in rounds.items():
        if other == "understudy":
            continue
        for mine, theirs in zip(ours, levels):
            tok = [a["tok_s"] / b["tok_s"] for a, b in zip(mine, theirs) if b["tok_s"]]
            ttft = [a["ttft50"] / b["ttft50"] for a, b in zip(mine, theirs) if b["ttft50"] == b["ttft50"] and b["ttft50"]]
            print(f"  c={mine[0]['c']:<3} vs {other[:24]:<24} tok/s x{statistics.median(tok):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in tok)}); TTFT p50 x{statistics.median(ttft):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in ttft)})")


def print_ceiling(gguf: Path, levels: list[int], threads: int, max_tokens: int) -> None:
    """llama.cpp's own decode throughput with N sequences in one batch (``llama-batched-bench``):
    the engine's ceiling, which no server on these kernels can pass."""
    from build_llama_server import build

    bindir = build(Path(os.environ.get("UNDERSTUDY_CACHE", Path.home() / ".cache/understudy")), os.cpu_count() or 2)
    npl = ",".join(str(c) for c in levels)
    out = subprocess.run([str(bindir / "llama-batched-bench"), "-m", str(gguf), "-c", str(max(levels) * (128 + max_tokens) + 256),
                          "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", str(max_tokens), "-npl", npl, "-t", str(threads),
                          "-tb", str(threads)], capture_output=True, text=True, timeout=600)
    rows = []
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            rows.append((int(cells[2]), float(cells[7])))
    if not rows:
        print(f"\nllama-batched-bench gave no table (rc {out.returncode}): {out.stderr[-300:]}")
        return
    print(f"\nEngine ceiling: llama-batched-bench, 128-token prompts, {max_tokens} generated, {threads} threads "
          "(decode tok/s with N sequences in one batch, no server)")
    for n, tg in rows:
        print(f"  {n:>4} sequences: {tg:7.1f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
