#!/usr/bin/env python3
"""Soak: open-loop load at the box's capacity for 10 minutes, with failovers in the middle.

    .venv/bin/python scripts/soak.py                     # 600 s (make soak)
    .venv/bin/python scripts/soak.py --duration 120      # a shorter pass

Starts the fake cloud and Understudy as the outage drill does (``scripts/outage_drill.py``:
workloads triage and summaries covered, general not). Sends covered requests (triage and
summaries, alternately, half of them streamed) with Poisson arrivals at ``--rate`` requests a
second (default: 80 % of what the triage and summaries capacities ``understudy bench`` measured
allow for this half-and-half mix, from ``<state_dir>/capacity.json`` when it exists, else 2/s). The cloud refuses connections from 1/3
to 1/3 + 60 s of the run and hangs from 2/3 to 2/3 + 30 s. Every 5 s it samples the server's RSS,
open file descriptors and a ``/metrics`` scrape time.

Prints, and checks against the stated bounds:
- requests sent, answered (200), refused cleanly (4xx/5xx in OpenAI's shape, or a stream's error
  event) and **lost** (no answer at all: a connection error or a timeout) — lost must be 0;
- RSS after the first minute (warm) and at the end: growth within ``--rss-bound-mb`` (80 MB);
- open file descriptors at the start and the end: growth within 16;
- ``/metrics`` scrape time p50/p99 under this load (the issue's target: < 5 ms), beside a ``/health``
  call made just before each scrape (what any request waits for the event loop under this load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from fake_cloud import FakeCloud  # noqa: E402
from outage_drill import cloud_script, pct, start_server, stop_server  # noqa: E402

NOTE = ("58-year-old man with central chest pain radiating to the left arm for forty minutes, sweating and "
        "nauseous. History of hypertension. ECG pending. Aspirin given in the ambulance.")
TRIAGE = "I have had a mild sore throat for two days and no fever."


def default_rate(state: Path) -> float:
    try:
        capacity = json.loads((state / "capacity.json").read_text())
        # half the requests go to each workload: the slower one sets the pace
        slowest = min(float(capacity[k]["rate_per_min"]) for k in ("triage", "summaries"))
        return max(0.5, 2 * slowest / 60 * 0.8)
    except (OSError, ValueError, KeyError, TypeError):
        return 2.0


async def one(client: httpx.AsyncClient, i: int, counts: dict[str, int]) -> None:
    workload = ("triage", "summaries")[i % 2]
    stream = i % 4 >= 2
    content = TRIAGE if workload == "triage" else f"Summarise this note:\n\n{NOTE}"
    body = {"model": workload, "messages": [{"role": "user", "content": content}], "max_tokens": 48, "stream": stream}
    counts["sent"] += 1
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Workload": workload}) as r:
            data = (await r.aread()).decode(errors="replace")
        if r.status_code != 200:
            shaped = "error" in json.loads(data) if data.startswith("{") else False
            counts["refused_clean" if shaped else "bad_error"] += 1
        elif stream and "[DONE]" not in data:
            counts["lost"] += 1  # a stream cut without its end
        elif stream and '"error"' in data:
            counts["refused_clean"] += 1
        else:
            counts["ok"] += 1
    except (httpx.HTTPError, ValueError):
        counts["lost"] += 1


async def sampler(url: str, pid: int, stop_at: float, samples: list[dict[str, float]]) -> None:
    proc = psutil.Process(pid)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            await client.get("/health")
            t1 = time.perf_counter()
            await client.get("/metrics")
            scrape = time.perf_counter() - t1
            samples.append({"t": time.monotonic(), "rss": proc.memory_info().rss, "fds": proc.num_fds(), "scrape": scrape,
                            "health": t1 - t0})
            await asyncio.sleep(5)


async def run(url: str, pid: int, rate: float, duration: float) -> tuple[dict[str, int], list[dict[str, float]]]:
    counts = {"sent": 0, "ok": 0, "refused_clean": 0, "bad_error": 0, "lost": 0}
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    stop_at = start + duration
    rng = random.Random(11)
    tasks: set[asyncio.Task[None]] = set()
    sampling = asyncio.create_task(sampler(url, pid, stop_at, samples))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        next_at = start
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(one(client, i, counts))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    await sampling
    return counts, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--rate", type=float, help="requests a second (default: 80 %% of the measured capacity, else 2)")
    parser.add_argument("--rss-bound-mb", type=float, default=80.0)
    parser.add_argument("--state", type=Path, default=Path(".understudy"), help="where to look for capacity.json")
    args = parser.parse_args()
    rate = args.rate or default_rate(args.state)
    cloud = FakeCloud(script=cloud_script).start()
    with tempfile.TemporaryDirectory(prefix="understudy-soak-") as tmp:
        server, url, log = start_server(cloud, Path(tmp), shadow_rate=0.1)
        try:
            print(f"Soak: {args.duration:.0f} s at {rate:.2f} requests/s (Poisson), cloud down at 1/3 (refuse, 60 s) "
                  "and 2/3 (hang, 30 s)", flush=True)
            counts, samples = asyncio.run(run_with_faults(url, server.pid, cloud, rate, args.duration))
        finally:
            stop_server(server, log)
            cloud.stop()
    warm = next((s for s in samples if s["t"] - samples[0]["t"] >= 60), samples[0])
    end = samples[-1]
    growth_mb = (end["rss"] - warm["rss"]) / 2**20
    fd_growth = end["fds"] - samples[0]["fds"]
    scrapes = [s["scrape"] for s in samples]
    health = [s["health"] for s in samples]
    print(f"\nrequests: {counts['sent']} sent, {counts['ok']} answered, {counts['refused_clean']} refused cleanly, "
          f"{counts['bad_error']} errors not in OpenAI's shape, {counts['lost']} lost")
    print(f"RSS: {warm['rss'] / 2**20:.0f} MB after the first minute, {end['rss'] / 2**20:.0f} MB at the end "
          f"({growth_mb:+.1f} MB; bound {args.rss_bound_mb:.0f} MB)")
    print(f"open file descriptors: {samples[0]['fds']:.0f} at the start, {end['fds']:.0f} at the end ({fd_growth:+.0f}; bound 16)")
    print(f"/metrics scrape under load: p50 {pct(scrapes, 50) * 1000:.2f} ms, p99 {pct(scrapes, 99) * 1000:.2f} ms "
          f"({len(scrapes)} scrapes; target < 5 ms); GET /health just before each: p50 {pct(health, 50) * 1000:.2f} ms "
          "(the event loop's own delay under this load)")
    ok = counts["lost"] == 0 and counts["bad_error"] == 0 and growth_mb <= args.rss_bound_mb and fd_growth <= 16
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


async def run_with_faults(url: str, pid: int, cloud: FakeCloud, rate: float, duration: float) -> tuple[dict[str, int], list[dict[str, float]]]:
    start = time.monotonic()

    async def faults() -> None:
        for at, mode in ((duration / 3, "refuse"), (duration / 3 + min(60.0, duration / 6), "ok"),
                         (2 * duration / 3, "hang"), (2 * duration / 3 + min(30.0, duration / 12), "ok")):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            print(f"  t={time.monotonic() - start:5.0f} s: cloud {mode}", flush=True)
            cloud.set_fault(mode)

    fault_task = asyncio.create_task(faults())
    result = await run(url, pid, rate, duration)
    fault_task.cancel()
    return result


if __name__ == "__main__":
    sys.exit(main())
