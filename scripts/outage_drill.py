#!/usr/bin/env python3
"""Outage drill: steady load, the cloud dies, the cloud comes back. Prints what the clients saw.

    .venv/bin/python scripts/outage_drill.py                 # refuse, hang, slow: ~3 minutes
    .venv/bin/python scripts/outage_drill.py --kinds hang    # one kind of outage
    .venv/bin/python scripts/outage_drill.py --healthy 10 --outage 20 --recovery 10

What it does, in one run on this machine:
1. Starts the fake cloud (``scripts/fake_cloud.py``, real HTTP on loopback) and Understudy (a
   subprocess, default prober pace and breaker settings) with three workloads: ``triage`` and
   ``summaries`` covered by the local model, ``general`` not covered.
2. Pass-through overhead: the same non-streaming request sent alternately straight to the fake
   cloud and through Understudy, with the official ``openai`` client; p50 of each and the
   difference.
3. Steady load with the official ``openai`` client (streaming and not, alternating): a few
   clients per workload, each sending a request, then pausing briefly. After ``--healthy``
   seconds the cloud fails, one way per kind of outage (``--kinds``), each with a fresh server:
   ``refuse`` (connections refused, open connections dropped, as when its process dies),
   ``hang`` (connections accepted, nothing ever answered, probes included), ``slow`` (a
   brownout: the first token after ``--slow-delay`` s, probes still fast). After ``--outage``
   seconds it is brought back.
4. Prints requests sent / succeeded / failed and served locally by workload; time from the
   outage to the breaker opening (or judging the cloud slow) and to the first local answer; the
   slowest covered first token during the outage against the first-token deadline; time from
   recovery to the first cloud answer; p50/p99 latency before, during and after; the hedges
   started while the cloud was healthy; and checks the targets of each kind.
6. Shadow mode: first, pass-through latency with ``shadow_rate`` 0, 0.1 and 1 (three servers,
   interleaved, one run); then every scenario runs with ``shadow_rate = 0.1`` on triage and
   summaries (the fake cloud answers triage with the JSON its ``cloud_system_prompt`` asks for),
   and the shadow readiness measured before the outage is printed next to what the outage
   showed. A disagreement between them is printed as a finding.
5. Triage is answered locally by the ``triage-minilm`` classifier over ``/v1/chat/completions``
   (the cloud is asked for the same JSON through ``cloud_system_prompt``): the drill checks that
   every local triage answer is the template's JSON with the right label, and calls
   ``/v1/triage`` while the cloud is down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from fake_cloud import FakeCloud  # noqa: E402

LOCAL_MODEL = "smollm2-135m-instruct"
TRIAGE_MODEL = "triage-minilm"
MESSAGE = "58-year-old with chest pain radiating to the left arm, sweating."
EXPECTED_LABEL = "emergent"
WORKLOADS = {"triage": True, "summaries": True, "general": False}  # name -> covered
MODELS = {"triage": "triage", "summaries": "summaries", "general": "gpt-4o"}
CONNECT_TIMEOUT_S = 2.0
FIRST_BYTE_TIMEOUT_S = 60.0  # the default: an uncovered request's own limit
PROBE_INTERVAL_S = 5.0  # the default probe pace while healthy
SHADOW_RATE = 0.1  # shadow mode during the healthy phase: readiness measured before each outage
LOCAL_MARGIN_S = 1.0  # a local answer's own time on top of the deadline (classifier, extract, or first token)
OUTAGES = {"refuse": ("refuse", "down: connections refused"), "hang": ("hang", "hung: connections accepted, never answered"),
           "slow": ("slow", "slow: first token after the slow delay, probes still fast")}


@dataclass
class Result:
    workload: str
    started: float
    ended: float
    ok: bool
    route: str
    reason: str
    status: int
    retry_after: bool
    stream: bool
    ttft: float | None = None
    text: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloud_script(body: dict[str, Any]) -> str:
    """The fake cloud's answers in the drill: triage's JSON (what its cloud_system_prompt asks
    for), a one-line summary for the summaries workload, the fixed sentence for the rest."""
    messages = json.dumps(body.get("messages"))
    if "Classify the message" in messages:
        return f'{{"label": "{EXPECTED_LABEL}", "confidence": 0.93}}'
    if body.get("model") == "gpt-4o-mini":
        return "58-year-old with chest pain radiating to the left arm and sweating."
    return "The cloud model says hello and answers your question in full."


def write_config(path: Path, cloud_url: str, state: Path, shadow_rate: float = SHADOW_RATE) -> None:
    path.write_text(f"""
[server]
state_dir = "{state}"
cache_dir = "{ROOT / '.cache' / 'scripts'}"
log_level = "warning"

[[upstreams]]
name = "cloud"
base_url = "{cloud_url}"
api_key_env = "DRILL_CLOUD_KEY"
connect_timeout_s = {CONNECT_TIMEOUT_S}

[[workloads]]
name = "triage"
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{TRIAGE_MODEL}"
priority = "high"
shadow_rate = {shadow_rate}
cloud_system_prompt = "Classify the message's urgency. Answer with JSON only: {{\\"label\\": ..., \\"confidence\\": ...}}"

[[workloads]]
name = "summaries"
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{LOCAL_MODEL}"
summary_method = "extractive"
max_words = 40
shadow_rate = {shadow_rate}

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
""")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(q / 100 * (len(values) - 1)))))
    return values[k]


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.1f} ms"


async def one_request(client: openai.AsyncOpenAI, workload: str, stream: bool, max_tokens: int) -> Result:
    started = time.monotonic()
    messages = [{"role": "user", "content": MESSAGE}]
    try:
        if stream:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODELS[workload], messages=messages, max_tokens=max_tokens, stream=True)
            text = ""
            first = None
            async for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.monotonic()
                    text += chunk.choices[0].delta.content
            headers = raw.headers
        else:
            raw = await client.chat.completions.with_raw_response.create(model=MODELS[workload], messages=messages, max_tokens=max_tokens)
            text = raw.parse().choices[0].message.content or ""
            headers = raw.headers
            first = None
        ok = bool(text)
        return Result(workload, started, time.monotonic(), ok, headers.get("x-understudy-route", "?"),
                      headers.get("x-understudy-fallback-reason", ""), raw.http_response.status_code, False, stream,
                      first - started if first else None, text)
    except openai.APIStatusError as exc:
        h = exc.response.headers
        return Result(workload, started, time.monotonic(), False, h.get("x-understudy-route", "?"),
                      h.get("x-understudy-fallback-reason", ""), exc.status_code, "retry-after" in h, stream)
    except openai.APITimeoutError:
        return Result(workload, started, time.monotonic(), False, "?", "client_timeout", 0, False, stream)
    except openai.APIError as exc:
        return Result(workload, started, time.monotonic(), False, "?", type(exc).__name__, 0, False, stream)


async def client_loop(base: str, workload: str, stop_at: float, out: list[Result], max_tokens: int, pause: float, seed: int) -> None:
    client = openai.AsyncOpenAI(base_url=base, api_key="drill", max_retries=0, timeout=FIRST_BYTE_TIMEOUT_S + 30)
    stream = bool(seed % 2)
    try:
        while time.monotonic() < stop_at:
            out.append(await one_request(client, workload, stream, max_tokens))
            stream = not stream
            await asyncio.sleep(pause)
    finally:
        await client.close()


async def watch_breaker(url: str, stop_at: float, states: list[tuple[float, str]]) -> None:
    async with httpx.AsyncClient(timeout=5) as c:
        last = None
        while time.monotonic() < stop_at:
            try:
                state = (await c.get(url + "/admin/status")).json()["upstreams"]["cloud"]["breaker"]
            except (httpx.HTTPError, KeyError, ValueError):
                state = "?"
            if state != last:
                states.append((time.monotonic(), state))
                last = state
            await asyncio.sleep(0.02)


async def local_ttft_idle(url: str, max_tokens: int) -> float:
    """The local model's time to first token with nothing else running (the same prompt)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="drill", max_retries=0, timeout=60)
    MODELS["_local"] = LOCAL_MODEL
    try:
        ttfts = [(await one_request(client, "_local", True, max_tokens)).ttft for _ in range(5)]
    finally:
        await client.close()
        del MODELS["_local"]
    return statistics.median(t for t in ttfts if t is not None)


def measure_overhead(cloud_url: str, server_url: str, samples: int) -> tuple[list[float], list[float]]:
    direct_client = openai.OpenAI(base_url=cloud_url, api_key="drill", max_retries=0, timeout=10)
    via_client = openai.OpenAI(base_url=server_url + "/v1", api_key="drill", max_retries=0, timeout=10)
    msg = [{"role": "user", "content": MESSAGE}]  # a real triage message: shadow mode then compares like for like
    direct: list[float] = []
    via: list[float] = []
    try:
        for i in range(samples + 20):
            for client, bucket in ((direct_client, direct), (via_client, via)) if i % 2 else ((via_client, via), (direct_client, direct)):
                model = "gpt-4o-mini" if client is direct_client else "triage"
                t = time.perf_counter()
                client.chat.completions.create(model=model, messages=msg, max_tokens=8)
                if i >= 20:  # warm-up first
                    bucket.append(time.perf_counter() - t)
    finally:
        direct_client.close()
        via_client.close()
    return direct, via


def measure_shadow_overhead(cloud: FakeCloud, samples: int) -> None:
    """Pass-through p50 with shadow mode off, at 10 % and at 100 %: three servers, the requests
    interleaved with direct calls to the fake cloud, in one run."""
    servers = []
    try:
        for rate in (0.0, 0.1, 1.0):
            tmp = Path(tempfile.mkdtemp(prefix=f"understudy-shadow-{rate:g}-"))
            servers.append((rate, *start_server(cloud, tmp, rate)))
        direct_client = openai.OpenAI(base_url=cloud.url, api_key="drill", max_retries=0, timeout=10)
        clients = [(rate, openai.OpenAI(base_url=url + "/v1", api_key="drill", max_retries=0, timeout=10)) for rate, _, url, _ in servers]
        msg = [{"role": "user", "content": MESSAGE}]
        direct: list[float] = []
        via: dict[float, list[float]] = {rate: [] for rate, _ in clients}
        for i in range(samples + 20):
            order = [(None, direct_client), *clients]
            for rate, client in (order if i % 2 else order[::-1]):
                t = time.perf_counter()
                client.chat.completions.create(model="gpt-4o-mini" if rate is None else "triage", messages=msg, max_tokens=8)
                if i >= 20:
                    (direct if rate is None else via[rate]).append(time.perf_counter() - t)
        d50 = statistics.median(direct)
        print("\n== Shadow mode's cost to the cloud path (pass-through, non-streaming, interleaved, one run)")
        print(f"   direct to fake cloud: p50 {ms(d50)}")
        for rate, values in via.items():
            print(f"   shadow_rate {rate:>4g}: p50 {ms(statistics.median(values))}, added {ms(statistics.median(values) - d50)}")
        off, tenth, full = (statistics.median(via[r]) for r in (0.0, 0.1, 1.0))
        print(f"   [{'PASS' if tenth - off <= 0.001 else 'FAIL'}] shadow_rate 0.1 within 1 ms of shadow off "
              f"({ms(tenth - off)}); at 100 %: {ms(full - off)}")
        # Real local work next to shadow work: /v1/triage (local, high priority) while the same
        # pass-through traffic runs, on the server without shadow and on the one at 100 %.
        print("   real local requests (/v1/triage, sequential) while pass-through traffic runs:")
        for rate, _, url, _ in (servers[0], servers[2]):
            lat = asyncio.run(_triage_beside_passthrough(url, samples))
            status = httpx.get(url + "/admin/status", timeout=10).json()["models"]["minilm-l6-v2"]["engine"]
            print(f"   shadow_rate {rate:>4g}: /v1/triage p50 {ms(pct(lat, 50))}, p95 {ms(pct(lat, 95))}, max {ms(max(lat))} "
                  f"({status['batches']} embedding batches so far, largest {status['max_batch']})")
        for rate, _, url, _ in servers:
            ready = httpx.get(url + "/admin/readiness", timeout=10).json()["workloads"].get("triage", {})
            if rate:
                print(f"   shadow_rate {rate:g}: triage readiness {ready.get('readiness')} over {ready.get('samples')} samples, "
                      f"outcomes {ready.get('counts')}")
        direct_client.close()
        for _, client in clients:
            client.close()
    finally:
        for _, server, _, log in servers:
            stop_server(server, log)


async def _triage_beside_passthrough(url: str, samples: int) -> list[float]:
    """``samples`` sequential /v1/triage calls while two clients send covered pass-through
    requests (each one shadowed on a server with ``shadow_rate = 1``)."""
    stop = False
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        async def passthrough() -> None:
            while not stop:
                await c.post("/v1/chat/completions", json={"model": "triage", "messages": [{"role": "user", "content": MESSAGE}],
                                                          "max_tokens": 8})

        load = [asyncio.create_task(passthrough()) for _ in range(2)]
        await asyncio.sleep(0.5)
        out = []
        for _ in range(samples):
            t = time.perf_counter()
            r = await c.post("/v1/triage", json={"input": MESSAGE})
            r.raise_for_status()
            out.append(time.perf_counter() - t)
        stop = True
        await asyncio.gather(*load)
    return out


def report(kind: str, results: list[Result], t_out: float, t_rec: float, t_end: float, states: list[tuple[float, str]],
           overhead: tuple[list[float], list[float]] | None, idle_ttft: float, triage_api: dict[str, object],
           deadlines: dict[str, float], healthy: dict[str, int], shadow: dict[str, Any]) -> list[tuple[str, bool]]:
    print(f"\n######## Outage kind: {kind} ({OUTAGES[kind][1]})")
    added = float("nan")
    if overhead is not None:
        direct, via = overhead
        print("\n== Pass-through overhead (cloud healthy, non-streaming, official openai client, sequential)")
        d50, v50 = statistics.median(direct), statistics.median(via)
        added = v50 - d50
        print(f"   direct to fake cloud: p50 {ms(d50)}  p99 {ms(pct(direct, 99))}   ({len(direct)} requests)")
        print(f"   through Understudy:   p50 {ms(v50)}  p99 {ms(pct(via, 99))}   ({len(via)} requests)")
        print(f"   added latency p50:    {ms(added)}")

    print("\n== Requests by workload")
    print(f"   {'workload':<10} {'covered':<8} {'sent':>5} {'ok':>5} {'failed':>6} {'local':>6} {'503+Retry-After':>16} {'other failures':>15}")
    for wl, covered in WORKLOADS.items():
        rs = [r for r in results if r.workload == wl]
        failed = [r for r in rs if not r.ok]
        proper = [r for r in failed if r.status == 503 and r.retry_after and r.reason]
        print(f"   {wl:<10} {str(covered):<8} {len(rs):>5} {sum(r.ok for r in rs):>5} {len(failed):>6} "
              f"{sum(r.ok and r.route == 'local' for r in rs):>6} {len(proper):>16} {len(failed) - len(proper):>15}")

    covered = [r for r in results if WORKLOADS[r.workload]]
    local_after = sorted((r for r in covered if r.ok and r.route == "local" and r.started >= t_out), key=lambda r: r.ended)
    first_after = sorted((r for r in covered if r.started >= t_out), key=lambda r: r.started)
    cloud_after = sorted((r for r in covered if r.ok and r.route == "cloud" and r.started >= t_rec), key=lambda r: r.ended)
    opened = next((t for t, s in states if t >= t_out and s == "open"), None)
    slow_at = next((t for t, s in states if t >= t_out and s == "slow"), None)
    closed_again = next((t for t, s in states if t >= t_rec and s == "closed"), None)

    print("\n== Outage timeline (t = 0 when the cloud went down)")
    print(f"   breaker open after:              {ms(opened - t_out) if opened else 'never'}")
    print(f"   cloud judged slow after:         {ms(slow_at - t_out) if slow_at else 'never'}")
    if local_after:
        print(f"   first local answer after:        {ms(local_after[0].ended - t_out)}")
    if first_after:
        r = first_after[0]
        print(f"   first request after the outage:  {r.route} ({r.reason or 'no reason'}), "
              f"{'streamed, first token' if r.stream else 'JSON, answered'} in {ms(r.ttft if r.stream and r.ttft else r.latency)}")
    first_stream = next((r for r in first_after if r.stream), None)
    local_ttfts = [r.ttft for r in covered if r.route == "local" and r.ttft is not None and t_out <= r.started < t_rec]
    local_ttft = pct(local_ttfts, 50)
    if first_stream is not None and first_stream.ttft is not None:
        print(f"   first streamed request after:    {first_stream.route} ({first_stream.reason}), first token in {ms(first_stream.ttft)}")
    print(f"   local time to first token:       idle {ms(idle_ttft)}, p50 during the outage {ms(local_ttft)}")
    print(f"   breaker closed after recovery:   {ms(closed_again - t_rec) if closed_again else 'never'}")
    print(f"   first cloud answer after recovery: {ms(cloud_after[0].ended - t_rec) if cloud_after else 'never'}")
    reasons: dict[str, int] = {}
    for r in covered:
        if r.route == "local":
            reasons[r.reason or "-"] = reasons.get(r.reason or "-", 0) + 1
    print(f"   local answers by reason:         {reasons}")

    print("\n== Latency of successful requests (by when they started)")
    print(f"   {'phase':<8} {'workloads':<10} {'n':>5} {'p50':>10} {'p99':>10}")
    phases = [("before", 0.0, t_out), ("during", t_out, t_rec), ("after", t_rec, t_end)]
    for name, a, b in phases:
        for label, pick in (("covered", True), ("uncovered", False)):
            lat = [r.latency for r in results if a <= r.started < b and r.ok and WORKLOADS[r.workload] is pick]
            print(f"   {name:<8} {label:<10} {len(lat):>5} {ms(pct(lat, 50)):>10} {ms(pct(lat, 99)):>10}")

    triage_local = [r for r in results if r.workload == "triage" and r.ok and r.route == "local"]

    def label_of(text: str) -> str | None:
        try:
            return json.loads(text).get("label")
        except (ValueError, AttributeError):
            return None

    labels = [label_of(r.text) for r in triage_local]
    print("\n== Shadow readiness before the outage, next to what the outage showed")
    for name, w in shadow.items():
        print(f"   {name}: readiness {w.get('readiness')} over {w.get('samples')} samples ({w.get('metric')}); outcomes {w.get('counts')}")
    agree = sum(lab == EXPECTED_LABEL for lab in labels) / len(labels) if labels else None
    print(f"   triage during the outage: {len(labels)} local answers, share with the cloud's label ({EXPECTED_LABEL}): "
          f"{agree if agree is None else round(agree, 3)}")
    ready = shadow.get("triage", {}).get("readiness")
    if ready is not None and agree is not None and abs(ready - agree) > 0.1:
        print(f"   FINDING: shadow readiness {ready} and the outage's agreement {agree:.3f} differ by more than 0.1")
    print("\n== Triage answered locally (triage-minilm, chat completions)")
    print(f"   {len(triage_local)} local answers ({sum(r.stream for r in triage_local)} streamed); "
          f"labels: { {lab: labels.count(lab) for lab in set(labels)} }")
    print(f"   /v1/triage during the outage: {triage_api}")

    uncovered_failed = [r for r in results if not WORKLOADS[r.workload] and not r.ok]
    first_ttft = first_stream.ttft if first_stream is not None and first_stream.ttft is not None else float("inf")
    during = [r for r in covered if t_out <= r.started < t_rec]
    deadline = max(deadlines.values(), default=float("nan"))

    def first_content(r: Result) -> float:
        return r.ttft if r.stream and r.ttft is not None else r.latency

    slowest = max((first_content(r) for r in during if r.ok), default=0.0)
    limit = deadline + LOCAL_MARGIN_S
    hedge_share = healthy["hedged"] / max(1, healthy["covered_cloud_attempts"])
    print("\n== Deadlines and hedges")
    print(f"   first-token deadline at the outage: {', '.join(f'{k} {v:.2f} s' for k, v in deadlines.items())}")
    print(f"   slowest covered first content during the outage: {ms(slowest)} (deadline + local margin {ms(limit)})")
    print(f"   hedges while the cloud was healthy: {healthy['hedged']} of {healthy['covered_cloud_attempts']} covered cloud "
          f"requests ({hedge_share:.1%}), {healthy['hedges_won_by_local']} won by the local answer")
    cloud_back = cloud_after[0].ended - t_rec if cloud_after else float("inf")
    timeouts = sum(r.reason == "client_timeout" for r in results)
    checks = [
        ("covered workloads: 0 failed requests", sum(not r.ok for r in covered) == 0),
        ("no client ever timed out", timeouts == 0),
        ("uncovered failures: all 503 + Retry-After + reason", all(r.status == 503 and r.retry_after and r.reason for r in uncovered_failed)),
        ("traffic failed back to the cloud after recovery", bool(cloud_after)),
        (f"healthy cloud: hedges <= 2 % of covered requests ({hedge_share:.1%})", hedge_share <= 0.02),
    ]
    if overhead is not None:
        checks.append((f"pass-through overhead p50 <= 2 ms ({ms(added)})", added <= 0.002))
    if kind == "refuse":
        checks += [
            (f"first streamed request after the outage: local, first token within the connect timeout ({CONNECT_TIMEOUT_S:g} s) "
             f"+ the local time to first token ({ms(first_ttft)} <= {ms(CONNECT_TIMEOUT_S + local_ttft)})",
             first_stream is not None and first_stream.route == "local" and first_ttft <= CONNECT_TIMEOUT_S + local_ttft),
            ("breaker knew within 1 s of the outage", opened is not None and opened - t_out <= 1.0),
            (f"uncovered failures never hang past the connect timeout (max {ms(max((r.latency for r in uncovered_failed), default=0))})",
             all(r.latency < CONNECT_TIMEOUT_S for r in uncovered_failed)),
            (f"triage during the outage: every local answer is the template's JSON, labelled {EXPECTED_LABEL}",
             bool(triage_local) and all(lab == EXPECTED_LABEL for lab in labels)),
            ("/v1/triage answered during the outage", triage_api.get("label") == EXPECTED_LABEL),
        ]
    else:
        checks.append((f"every covered request during the outage had its first content within the deadline + local "
                       f"margin ({ms(slowest)} <= {ms(limit)})", bool(during) and slowest <= limit))
    if kind == "hang":
        worst = max((r.latency for r in uncovered_failed), default=0.0)
        checks.append((f"uncovered requests during the hang: a 503 once the breaker opened or the first-byte timeout "
                       f"({FIRST_BYTE_TIMEOUT_S:g} s) passed, whichever first (max {ms(worst)})",
                       all(r.latency <= FIRST_BYTE_TIMEOUT_S + 1 for r in uncovered_failed)))
    if kind == "slow":
        checks += [
            ("the slow cloud was ejected (breaker state slow)", slow_at is not None),
            (f"after recovery, covered traffic back on the cloud within one probe interval ({PROBE_INTERVAL_S:g} s): "
             f"{ms(cloud_back)}", cloud_back <= PROBE_INTERVAL_S),
        ]
    print("\n== Targets")
    for label, ok in checks:
        print(f"   [{'PASS' if ok else 'FAIL'}] {label}")
    return checks


async def triage_during_outage(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(url + "/v1/triage", json={"input": MESSAGE})
        if r.status_code != 200:
            return {"status": r.status_code}
        d = r.json()["data"][0]
        return {"status": 200, "label": d["label"], "confidence": d["confidence"], "red_flags": d["red_flags"],
                "route": r.headers.get("x-understudy-route")}


async def load(url: str, t_out_offset: float, duration: float, clients: int, max_tokens: int, pause: float,
               cloud: FakeCloud, outage: float, kind: str, slow_delay: float,
               ) -> tuple[list[Result], float, float, float, list[tuple[float, str]], dict[str, object], dict[str, int],
                          dict[str, float], dict[str, Any]]:
    results: list[Result] = []
    states: list[tuple[float, str]] = []
    start = time.monotonic()
    stop_at = start + duration
    tasks = [asyncio.create_task(client_loop(url + "/v1", wl, stop_at, results, max_tokens, pause, i))
             for wl in WORKLOADS for i in range(clients)]
    tasks.append(asyncio.create_task(watch_breaker(url, stop_at, states)))
    await asyncio.sleep(t_out_offset)
    status = await asyncio.to_thread(lambda: httpx.get(url + "/admin/status", timeout=10).json()["failover"])
    healthy = {k: v for k, v in status.items() if isinstance(v, int)}
    shadow = await asyncio.to_thread(lambda: httpx.get(url + "/admin/readiness", timeout=10).json()["workloads"])
    deadlines = {f"{wl} {k}": v for wl, d in status["first_token_deadline_s"].items() for k, v in d.items()}
    t_out = time.monotonic()
    await asyncio.to_thread(cloud.set_fault, kind, delay=slow_delay)
    print(f"   t={t_out - start:5.1f} s  cloud {OUTAGES[kind][1]}", flush=True)
    await asyncio.sleep(outage / 2)
    triage_api = await triage_during_outage(url)
    await asyncio.sleep(outage / 2)
    t_rec = time.monotonic()
    # A crawling cloud recovers without dropping its connections; a dead or hung one was restarted.
    await asyncio.to_thread(cloud.set_fault, "ok", drop_connections=kind != "slow")
    print(f"   t={t_rec - start:5.1f} s  cloud back", flush=True)
    await asyncio.gather(*tasks)
    return results, t_out, t_rec, time.monotonic(), states, triage_api, healthy, deadlines, shadow


def start_server(cloud: FakeCloud, tmp: Path, shadow_rate: float = SHADOW_RATE) -> tuple[subprocess.Popen[bytes], str, object]:
    config = tmp / "drill.toml"
    write_config(config, cloud.url, tmp / "state", shadow_rate)
    port = free_port()
    env = {**os.environ, "DRILL_CLOUD_KEY": "sk-drill-upstream"}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() - t0 > 120:
            raise SystemExit(f"Understudy did not start; see {tmp / 'server.log'}")
        time.sleep(0.1)
    print(f"Understudy ready in {time.monotonic() - t0:.1f} s; fake cloud on {cloud.url}; journal in {tmp / 'state'}")
    return server, url, log


def stop_server(server: subprocess.Popen[bytes], log: object) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="refuse,hang,slow", help="outages to run, each with a fresh server")
    parser.add_argument("--healthy", type=float, default=10.0, help="seconds of load before the outage")
    parser.add_argument("--outage", type=float, default=15.0, help="seconds the cloud stays down")
    parser.add_argument("--recovery", type=float, default=10.0, help="seconds of load after it comes back")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients per workload")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.1, help="seconds each client waits between requests")
    parser.add_argument("--overhead-samples", type=int, default=300)
    parser.add_argument("--slow-delay", type=float, default=20.0, help="slow outage: seconds to the cloud's first token")
    parser.add_argument("--shadow-samples", type=int, default=200, help="pass-through requests per shadow_rate (0: skip)")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in OUTAGES]
    if unknown:
        parser.error(f"unknown outage kind(s) {unknown}; known: {', '.join(OUTAGES)}")

    cloud = FakeCloud(script=cloud_script).start()
    summary: list[tuple[str, list[tuple[str, bool]]]] = []
    try:
        if args.shadow_samples:
            print(f"Measuring shadow mode's cost to the cloud path ({args.shadow_samples} requests to each server)...", flush=True)
            measure_shadow_overhead(cloud, args.shadow_samples)
        for i, kind in enumerate(kinds):
            cloud.set_fault("ok")
            tmp = Path(tempfile.mkdtemp(prefix=f"understudy-drill-{kind}-"))
            server, url, log = start_server(cloud, tmp)
            try:
                overhead = None
                if i == 0:
                    print(f"Measuring pass-through overhead ({args.overhead_samples} requests each way)...", flush=True)
                    overhead = measure_overhead(cloud.url, url, args.overhead_samples)
                idle_ttft = asyncio.run(local_ttft_idle(url, args.max_tokens))
                total = args.healthy + args.outage + args.recovery
                print(f"Outage '{kind}'. Load: {args.clients} clients x {len(WORKLOADS)} workloads for {total:g} s, "
                      f"max_tokens {args.max_tokens}", flush=True)
                results, t_out, t_rec, t_end, states, triage_api, healthy, deadlines, shadow = asyncio.run(
                    load(url, args.healthy, total, args.clients, args.max_tokens, args.pause, cloud, args.outage, kind,
                         args.slow_delay))
                summary.append((kind, report(kind, results, t_out, t_rec, t_end, states, overhead, idle_ttft, triage_api,
                                             deadlines, healthy, shadow)))
            finally:
                stop_server(server, log)
    finally:
        cloud.stop()
    print("\n######## Summary")
    for kind, checks in summary:
        print(f"   {kind:<7} {sum(ok for _, ok in checks)}/{len(checks)} targets met"
              + "".join(f"\n           FAIL: {label}" for label, ok in checks if not ok))
    return 0 if all(ok for _, checks in summary for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
