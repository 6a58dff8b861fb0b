"""``understudy drill``: start an outage drill on a running server, add synthetic load, print the report.

    understudy drill --duration 120                        # every upstream down for 2 minutes
    understudy drill --duration 120 --workloads triage     # only triage answered locally
    understudy drill --duration 120 --synthetic 60         # + 60 covered requests a minute
    understudy drill --duration 120 --synthetic last       # + half the capacity `understudy bench` measured
    understudy drill --abort                               # end the running drill now

The drill itself runs in the server (``server.drill``): if this command dies, the breakers still
come back when the duration is up. The API key is ``--key``, ``$UNDERSTUDY_ADMIN_KEY`` or ``$UNDERSTUDY_API_KEY`` (needed
when the server has keys). Exit status: 0 PASS, 1 FAIL, 2 the server refused (the message says
why), 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

_DATA = Path(__file__).resolve().parent.parent / "models" / "data"


def _examples() -> dict[str, list[str]]:
    """Example inputs per kind of workload: triage messages, clinical notes, a generic prompt."""
    out: dict[str, list[str]] = {"triage": [], "summaries": [], "other": ["Explain in two sentences why sleep matters."]}
    try:
        for line in (_DATA / "triage" / "examples.jsonl").read_text().splitlines():
            if line.strip():
                out["triage"].append(json.loads(line)["text"])
    except (OSError, ValueError, KeyError):
        pass
    notes = _DATA / "summaries" / "notes"
    if notes.is_dir():
        out["summaries"] = [p.read_text() for p in sorted(notes.glob("*.txt"))]
    return out


def _message(workload: dict[str, Any], examples: dict[str, list[str]], rng: random.Random) -> str:
    kind = workload.get("kind", "other")
    pool = examples.get(kind) or examples["other"]
    text = rng.choice(pool)
    return f"Summarise this note:\n\n{text}" if kind == "summaries" else text


async def _synthetic(url: str, headers: dict[str, str], workloads: list[dict[str, Any]], rate_per_min: float,
                     until: float, counts: dict[str, int], weights: list[float] | None = None) -> None:
    """Open-loop arrivals (Poisson, ``rate_per_min`` in all) of covered requests, round-robin over
    ``workloads`` (or drawn in proportion to ``weights``), until ``until`` (monotonic)."""
    rng = random.Random(7)
    examples = _examples()
    tasks: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        async def one(wl: dict[str, Any]) -> None:
            body = {"model": wl["name"], "messages": [{"role": "user", "content": _message(wl, examples, rng)}],
                    "max_tokens": 32}
            try:
                r = await client.post("/v1/chat/completions", json=body)
                key = f"{r.status_code} {r.headers.get('x-understudy-route', '?')}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1

        i = 0
        while time.monotonic() < until:
            await asyncio.sleep(rng.expovariate(rate_per_min / 60.0))
            if time.monotonic() >= until:
                break
            chosen = rng.choices(workloads, weights)[0] if weights else workloads[i % len(workloads)]
            task = asyncio.create_task(one(chosen))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)


def _plan(url: str, headers: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The covered workloads the drill will exercise, and a warning about the uncovered ones."""
    models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"]
    workloads: dict[str, dict[str, Any]] = {}
    for m in models:
        info = m.get("understudy") or {}
        if info.get("kind") == "workload" and m["id"] == info.get("workload"):
            workloads[m["id"]] = info
    chosen = [w for w in (args.workloads or "").split(",") if w]
    covered = [{"name": n, "kind": "triage" if n == "triage" else "summaries" if "summar" in n else "other"}
               for n, info in workloads.items() if info.get("fallback") == "local" and (not chosen or n in chosen)]
    uncovered = [n for n, info in workloads.items() if info.get("fallback") != "local"]
    if not chosen:
        where = args.upstreams or "every upstream"
        print(f"Drill: {where} taken down for {args.duration:g} s, as in a real outage.")
        if uncovered:
            print(f"  Uncovered workloads ({', '.join(uncovered)}) will get 503s with Retry-After for the duration.")
    else:
        print(f"Drill: workloads {', '.join(chosen)} answered locally for {args.duration:g} s; everything else keeps the cloud.")
    return covered


def _synthetic_arg(value: str) -> float | str:
    """``--synthetic``: a rate per minute, or ``last`` (from the last ``understudy bench``)."""
    if value == "last":
        return value
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate per minute or 'last', got {value!r}") from None
    if rate < 0 or rate != rate or rate == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a rate per minute of 0 or more, or 'last', got {value!r}")
    return rate


class NoCapacityReport(Exception):
    pass


def load_capacity(config_path: str | None) -> tuple[Path, dict[str, Any]]:
    """``<state_dir>/capacity.json`` of ``config_path`` (else $UNDERSTUDY_CONFIG, else the embedded
    default), as written by ``understudy bench``: ``{workload: {"rate_per_min", ...}}``."""
    from server.config import load_config

    config = load_config(Path(config_path) if config_path else None)
    path = Path(config.server.state_dir) / "capacity.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoCapacityReport(f"no capacity report at {path}: run `understudy bench` first (with the same --config) "
                               "or give --synthetic a rate per minute") from None
    except (OSError, ValueError) as exc:
        raise NoCapacityReport(f"cannot read the capacity report {path}: {exc}") from None
    capacity = data.get("capacity", data) if isinstance(data, dict) else None
    if not isinstance(capacity, dict):
        raise NoCapacityReport(f"the capacity report {path} is not a JSON object of workloads")
    return path, capacity


def rate_from_capacity(path: Path, capacity: dict[str, Any], covered: list[dict[str, Any]]) -> tuple[float, list[float], str]:
    """Half the sum of the drilled workloads' capacities, each workload drawn in proportion to its
    own capacity (so that each runs at half of what it sustains), and a line saying which file and
    rates were used."""
    rates: dict[str, float] = {}
    for wl in covered:
        entry = capacity.get(wl["name"])
        if isinstance(entry, dict) and isinstance(entry.get("rate_per_min"), (int, float)) and entry["rate_per_min"] > 0:
            rates[wl["name"]] = float(entry["rate_per_min"])
    if not rates:
        names = ", ".join(w["name"] for w in covered) or "none"
        raise NoCapacityReport(f"the capacity report {path} has no capacity for the drilled workloads ({names})")
    missing = [w["name"] for w in covered if w["name"] not in rates]
    weights = [rates.get(w["name"], 0.0) for w in covered]
    rate = sum(rates.values()) / 2
    line = (f"Synthetic load: {rate:g} requests/min, half the capacity measured by `understudy bench` "
            f"({', '.join(f'{n} {r:g}/min' for n, r in rates.items())}), from {path}")
    if missing:
        line += f"; no capacity measured for {', '.join(missing)}: none sent to them"
    return rate, weights, line


def _print_report(report: dict[str, Any]) -> None:
    print(f"\nDrill {report['id']}: {report['verdict']} (ran {report['duration_s']} s, ended by {report['ended_by']})")
    print(f"  {'workload':<12} {'requests':>8} {'local':>6} {'failed':>6} {'p50':>8} {'p95':>8} {'target':>7} {'1st local':>9}  verdict")
    for name, p in report["per_workload"].items():
        def s(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}s"
        print(f"  {name:<12} {p['requests']:>8} {p['local']:>6} {p['failed']:>6} {s(p['p50_s']):>8} {s(p['p95_s']):>8} "
              f"{p['target_p95_s']:>6g}s {s(p['first_local_answer_s']):>9}  {p['verdict']}")
    for model, q in report["queues"].items():
        running = f"peak running {q['running']}/{q['slots']}, " if q["slots"] else ""
        print(f"  queue {model}: {running}peak waiting {q['waiting']} {q['unit']} of {q['max_waiting']} allowed")
    for path in report.get("files", []):
        print(f"  report: {path}")


def cmd_drill(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    key = args.key or os.environ.get("UNDERSTUDY_ADMIN_KEY") or os.environ.get("UNDERSTUDY_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        if args.abort:
            r = httpx.delete(url + "/admin/drill", headers=headers, timeout=30)
            if r.status_code != 200:
                print(f"understudy drill: {r.status_code}: {r.json()['error']['message']}", file=sys.stderr)
                return 2
            _print_report(r.json()["report"])
            return 0 if r.json()["report"]["verdict"] == "PASS" else 1
        report: tuple[Path, dict[str, Any]] | None = None
        if args.synthetic == "last":  # before anything is asked of the server
            try:
                report = load_capacity(args.config)
            except NoCapacityReport as exc:
                print(f"understudy drill: {exc}", file=sys.stderr)
                return 2
        covered = _plan(url, headers, args)
        rate, weights = (0.0, None) if report is not None else (float(args.synthetic), None)
        if report is not None:
            try:
                rate, weights, line = rate_from_capacity(*report, covered)
            except NoCapacityReport as exc:
                print(f"understudy drill: {exc}", file=sys.stderr)
                return 2
            print(line)
        body: dict[str, Any] = {"duration_s": args.duration}
        if args.upstreams:
            body["upstreams"] = args.upstreams.split(",")
        if args.workloads:
            body["workloads"] = args.workloads.split(",")
        r = httpx.post(url + "/admin/drill", json=body, headers=headers, timeout=30)
        if r.status_code != 200:
            print(f"understudy drill: {r.status_code}: {r.json()['error']['message']}", file=sys.stderr)
            return 2
        drill = r.json()["drill"]
        print(f"Started {drill['id']}; the server ends it by itself after {drill['duration_s']:g} s "
              "(understudy drill --abort ends it now).", flush=True)
        until = time.monotonic() + args.duration
        counts: dict[str, int] = {}
        if rate and covered:
            asyncio.run(_synthetic(url, headers, covered, rate, until, counts, weights))
            print(f"Synthetic load: {sum(counts.values())} requests, {counts}")
        while True:
            status = httpx.get(url + "/admin/drill", headers=headers, timeout=30).json()
            if status["running"] is None and status["last"] is not None and status["last"]["id"] == drill["id"]:
                break
            time.sleep(0.5)
    except httpx.HTTPError as exc:
        print(f"understudy drill: cannot reach {url}: {type(exc).__name__}", file=sys.stderr)
        return 3
    report = status["last"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if report["verdict"] == "PASS" else 1


def cmd_readiness(args: argparse.Namespace) -> int:
    """Print ``GET /admin/readiness``: shadow mode's local readiness per workload."""
    key = args.key or os.environ.get("UNDERSTUDY_ADMIN_KEY") or os.environ.get("UNDERSTUDY_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(args.url.rstrip("/") + "/admin/readiness", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"understudy readiness: cannot reach {args.url}: {type(exc).__name__}", file=sys.stderr)
        return 3
    if r.status_code != 200:
        print(f"understudy readiness: {r.status_code}: {r.json()['error']['message']}", file=sys.stderr)
        return 2
    data = r.json()["workloads"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data:
        print("No workload has a shadow_rate: nothing measured.")
    for name, w in data.items():
        score = "n/a" if w["readiness"] is None else f"{w['readiness']:.3f}"
        print(f"{name}: readiness {score} over {w['samples']} samples in the last {w['window_s'] / 3600:g} h "
              f"({w['metric']}); outcomes {w['counts']}")
        for cloud, row in (w.get("confusion") or {}).items():
            print(f"   cloud {cloud:<20} -> local {row}")
        if w.get("supported") is not None:
            print(f"   local summaries' sentences found in the source: {w['supported']:.3f}")
    return 0


def add_parser(sub: Any) -> None:
    ready = sub.add_parser("readiness", help="shadow mode: how the local stand-in compares with the cloud, per workload")
    ready.add_argument("--url", default="http://127.0.0.1:8080")
    ready.add_argument("--key", help="API key (default: $UNDERSTUDY_ADMIN_KEY, else $UNDERSTUDY_API_KEY)")
    ready.add_argument("--json", action="store_true")
    ready.set_defaults(func=cmd_readiness)
    drill = sub.add_parser("drill", help="run an outage drill on a running server (the monthly generator test)")
    drill.add_argument("--url", default="http://127.0.0.1:8080")
    drill.add_argument("--key", help="API key (default: $UNDERSTUDY_ADMIN_KEY, else $UNDERSTUDY_API_KEY)")
    drill.add_argument("--duration", type=float, default=120.0, help="seconds (the server's max_drill_s caps it)")
    drill.add_argument("--upstreams", help="comma-separated upstreams to take down (default: all)")
    drill.add_argument("--workloads", help="comma-separated covered workloads to answer locally instead")
    drill.add_argument("--synthetic", type=_synthetic_arg, default=0.0, metavar="RATE",
                       help="add covered requests, RATE per minute in all, from the workloads' example inputs; "
                            "'last': half the capacity the last `understudy bench` measured (its state_dir/capacity.json)")
    drill.add_argument("--config", help="with --synthetic last: the config whose state_dir holds capacity.json "
                                        "(default: $UNDERSTUDY_CONFIG, else the embedded default)")
    drill.add_argument("--abort", action="store_true", help="end the running drill now")
    drill.add_argument("--json", action="store_true")
    drill.set_defaults(func=cmd_drill)
