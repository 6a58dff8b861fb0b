"""The outage drill, run by the server: the AI equivalent of a hospital's monthly generator test.

``POST /admin/drill`` starts one (``DrillManager.start``, on the event loop); a timer task in the
server ends it (``finish``), so the breakers come back even if the CLI that started it dies;
``DELETE /admin/drill`` ends it early. Two modes:

- ``upstreams`` (or neither key): those upstreams' breakers are forced open for the duration,
  exactly as in a real outage (``CircuitBreaker.force_open``): covered workloads are answered
  locally (``X-Understudy-Fallback-Reason: drill``), uncovered ones get their 503s;
- ``workloads``: only those covered workloads are answered locally, as if their upstream were
  down; everything else keeps using the cloud.

Live traffic keeps flowing and is served as in a real outage. At the end the report is built from
the journal's rows of the requests that started during the drill (so its numbers are the
journal's; answers under way get ``REPORT_GRACE_S`` to finish), plus the local
engines' queue peaks sampled during the drill; it is written as markdown and JSON under
``<state_dir>/drills/`` and as a ``drill`` row in the journal (numbers only).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.registry import ModelRegistry
from server.config import WorkloadConfig
from server.errors import ApiError, InvalidRequest
from server.failover.latency import percentile
from server.events import EventBus
from server.journal import Journal
from server.upstream import UpstreamSet

#: A workload's p95 target (seconds, whole answer as the journal records it) when it sets none.
DEFAULT_TARGET_P95_S = 5.0
SAMPLE_S = 0.2
#: After the end, answers already under way (routed during the drill) get this long to finish
#: before the report is built; a row counts when its request *started* within the drill.
REPORT_GRACE_S = 2.0


class DrillConflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "drill_running"


@dataclass
class Drill:
    id: str
    duration_s: float
    upstreams: tuple[str, ...]
    workloads: tuple[str, ...]
    started_at: float
    """Wall-clock time (the journal's ``ts``)."""
    started_mono: float
    ended_by: str | None = None
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    shadow_before: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    def describe(self, now_mono: float) -> dict[str, Any]:
        return {"id": self.id, "duration_s": self.duration_s, "upstreams": list(self.upstreams),
                "workloads": list(self.workloads), "started_at": self.started_at,
                "remaining_s": round(max(0.0, self.duration_s - (now_mono - self.started_mono)), 1),
                "ended_by": self.ended_by}


class DrillManager:
    """One drill at a time. ``forced_workloads`` is the router's ``drilled`` set (workloads mode)."""

    def __init__(self, upstreams: UpstreamSet, workloads: dict[str, WorkloadConfig], journal: Journal | None,
                 registry: ModelRegistry, state_dir: Path, max_duration_s: float, forced_workloads: set[str],
                 readiness: Callable[[], dict[str, Any]] | None = None, clock: Callable[[], float] = time.monotonic,
                 events: EventBus | None = None) -> None:
        """``journal``: read back for the report; ``events``: where the finished drill is published."""
        self.upstreams = upstreams
        self.events = events
        self.workloads = workloads
        self.journal = journal
        self.registry = registry
        self.folder = state_dir / "drills"
        self.max_duration_s = max_duration_s
        self.forced_workloads = forced_workloads
        self._readiness = readiness
        self.current: Drill | None = None
        self.last: Drill | None = None
        self._clock = clock
        self._timer: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None

    # -- commands (event loop) -------------------------------------------------------------------
    def start(self, body: Any) -> Drill:
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object: {\"duration_s\": ..., \"upstreams\"?: [...], \"workloads\"?: [...]}.")
        unknown = set(body) - {"duration_s", "upstreams", "workloads"}
        if unknown:
            raise InvalidRequest(f"Unknown field(s) {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
        duration = body.get("duration_s")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration < float("inf"):
            raise InvalidRequest("duration_s must be a positive number of seconds.", param="duration_s")
        if duration > self.max_duration_s:
            raise InvalidRequest(f"duration_s {duration:g} is longer than this server's maximum ({self.max_duration_s:g} s, "
                                 "[server] max_drill_s).", param="duration_s")
        upstreams = self._names(body, "upstreams", set(self.upstreams.by_name))
        workloads = self._names(body, "workloads", {w.name for w in self.workloads.values() if w.covered and not w.local_only})
        if upstreams and workloads:
            raise InvalidRequest("Give upstreams or workloads, not both.", param="workloads")
        if not upstreams and not workloads:
            upstreams = tuple(self.upstreams.by_name)
            if not upstreams:
                raise InvalidRequest("There is no upstream to take down: this server is purely local.", param="upstreams")
        if self.current is not None:
            raise DrillConflict(f"Drill {self.current.id} is running ({self.current.describe(self._clock())['remaining_s']} s left). "
                                "End it first (DELETE /admin/drill).")
        now = self._clock()
        drill = Drill(f"drill-{int(time.time())}", float(duration), upstreams, workloads, time.time(), now)
        drill.shadow_before = self._readiness() if self._readiness is not None else {}
        self.current = drill
        for name in upstreams:
            self.upstreams.by_name[name].breaker.force_open(f"drill {drill.id} started", until=now + duration)
        self.forced_workloads.update(workloads)
        self._timer = asyncio.create_task(self._run_timer(drill), name="drill-timer")
        self._sampler = asyncio.create_task(self._sample(drill), name="drill-sampler")
        return drill

    async def abort(self) -> Drill:
        drill = self.current
        if drill is None:
            raise InvalidRequest("No drill is running.", code="no_drill")
        if self._timer is not None:
            self._timer.cancel()
        await self.finish(drill, "abort")
        return drill

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {"running": self.current.describe(now) if self.current else None,
                "last": self.last.report if self.last else None, "max_duration_s": self.max_duration_s}

    async def close(self) -> None:
        """Server shutdown: a running drill ends (and is reported) now."""
        if self.current is not None:
            await self.abort()

    # -- internals -------------------------------------------------------------------------------
    def _names(self, body: dict[str, Any], key: str, known: set[str]) -> tuple[str, ...]:
        names = body.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidRequest(f"{key} must be a list of names.", param=key)
        bad = [n for n in names if n not in known]
        if bad:
            what = "upstream" if key == "upstreams" else "covered workload"
            raise InvalidRequest(f"Unknown {what} {', '.join(repr(b) for b in bad)} (known: {', '.join(sorted(known)) or 'none'}).",
                                 param=key)
        return tuple(dict.fromkeys(names))

    async def _run_timer(self, drill: Drill) -> None:
        await asyncio.sleep(drill.duration_s)
        if self.current is drill:
            await self.finish(drill, "timer")

    async def _sample(self, drill: Drill) -> None:
        """Every ``SAMPLE_S``: each engine's queue (an LLM's running and waiting requests, an
        embedding model's queued inputs) against its admission limit. A classifier's work shows
        on its embedding model."""
        while self.current is drill:
            for entry in self.registry.entries:
                engine = entry.engine
                if engine is None or not hasattr(engine, "status") or not hasattr(engine, "max_waiting"):
                    continue
                status = engine.status()
                llm = "slots" in status
                peak = drill.peaks.setdefault(entry.id, {"unit": "requests" if llm else "inputs", "slots": int(status.get("slots") or 0),
                                                         "running": 0, "waiting": 0, "max_waiting": int(engine.max_waiting)})
                peak["waiting"] = max(peak["waiting"], int(status.get("waiting" if llm else "queued_inputs") or 0))
                peak["running"] = max(peak["running"], int(status.get("running") or 0))
            await asyncio.sleep(SAMPLE_S)

    async def finish(self, drill: Drill, ended_by: str) -> None:
        """Restore the breakers first (at once, on the loop), then build and file the report."""
        if self.current is not drill:
            return
        self.current = None
        drill.ended_by = ended_by
        for name in drill.upstreams:
            self.upstreams.by_name[name].breaker.release(f"drill {drill.id} ended ({ended_by})")
        self.forced_workloads.clear()
        if self._sampler is not None:
            self._sampler.cancel()
        ended_at = time.time()
        await asyncio.sleep(REPORT_GRACE_S)
        rows = [r for r in await asyncio.to_thread(self._rows, drill.started_at, ended_at + REPORT_GRACE_S)
                if r["ts"] - (r["latency_ms"] or 0) / 1000 <= ended_at]
        drill.report = build_report(drill, rows, self.workloads, ended_at)
        self.last = drill
        await asyncio.to_thread(self._write, drill)

    def _rows(self, start: float, end: float) -> list[dict[str, Any]]:
        if self.journal is None:
            return []
        self.journal.flush()
        return self.journal.between(start, end, kind="route")

    def _write(self, drill: Drill) -> None:
        report = drill.report
        assert report is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        base = self.folder / drill.id
        base.with_suffix(".json").write_text(json.dumps(report, indent=2))
        base.with_suffix(".md").write_text(render_markdown(report))
        report["files"] = [str(base.with_suffix(".md")), str(base.with_suffix(".json"))]
        if self.events is not None:
            totals = report["totals"]
            self.events.record_drill(drill.id, report["verdict"], totals["requests"], totals["local"], totals["failed"],
                                      json.dumps({k: report[k] for k in ("duration_s", "ended_by", "upstreams", "workloads")}))


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def build_report(drill: Drill, rows: list[dict[str, Any]], workloads: dict[str, WorkloadConfig], ended_at: float) -> dict[str, Any]:
    """Per covered workload (and a line for the rest): what the journal saw during the drill, and
    PASS/FAIL against: no failed request, p95 within ``target_p95_s``, some traffic answered
    locally. A workload with no traffic at all is reported as such (it cannot pass)."""
    per: dict[str, dict[str, Any]] = {}
    covered = [w for w in workloads.values() if w.covered and not w.local_only
               and (not drill.workloads or w.name in drill.workloads)]
    for wl in covered:
        mine = [r for r in rows if r["workload"] == wl.name]
        ok = [r for r in mine if r["status"] is not None and r["status"] < 400]
        failed = [r for r in mine if r["status"] is None or r["status"] >= 500]
        local = [r for r in ok if r["route"] == "local"]
        latencies = [r["latency_ms"] / 1000 for r in ok if r["latency_ms"] is not None]
        target = wl.target_p95_s if wl.target_p95_s is not None else DEFAULT_TARGET_P95_S
        p95 = _pct(latencies, 95)
        first_local = min((r["ts"] for r in local), default=None)
        checks = {"no failed request": not failed, f"p95 <= {target:g} s": p95 is not None and p95 <= target,
                  "answered locally": bool(local)}
        per[wl.name] = {
            "requests": len(mine), "local": len(local), "cloud": len(ok) - len(local), "failed": len(failed),
            "client_errors": len(mine) - len(ok) - len(failed),
            "p50_s": _round(_pct(latencies, 50)), "p95_s": _round(p95), "target_p95_s": target,
            "first_local_answer_s": _round(first_local - drill.started_at if first_local is not None else None),
            "local_model": wl.local_model, "checks": checks, "verdict": "PASS" if all(checks.values()) else "FAIL",
        }
    others = [r for r in rows if r["workload"] not in per]
    total_failed = sum(p["failed"] for p in per.values())
    verdict = "PASS" if per and all(p["verdict"] == "PASS" for p in per.values()) else "FAIL"
    return {
        "id": drill.id, "started_at": drill.started_at, "ended_at": ended_at, "duration_s": round(ended_at - drill.started_at, 1),
        "planned_s": drill.duration_s, "ended_by": drill.ended_by, "upstreams": list(drill.upstreams),
        "workloads": list(drill.workloads), "mode": "workloads" if drill.workloads else "upstreams",
        "per_workload": per,
        "other_traffic": {"requests": len(others), "failed_503": sum(1 for r in others if r["status"] == 503)},
        "queues": {model: {**peak, "headroom": max(0, peak["max_waiting"] - peak["waiting"])} for model, peak in drill.peaks.items()},
        "totals": {"requests": sum(p["requests"] for p in per.values()), "local": sum(p["local"] for p in per.values()),
                   "failed": total_failed},
        "shadow_readiness_before": {name: {"readiness": r.get("readiness"), "samples": r.get("samples"), "metric": r.get("metric")}
                                    for name, r in drill.shadow_before.items()},
        "verdict": verdict,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def render_markdown(report: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["started_at"]))
    scope = (f"workloads {', '.join(report['workloads'])} answered locally" if report["mode"] == "workloads"
             else f"upstreams {', '.join(report['upstreams'])} taken down (breakers forced open)")
    lines = [f"# Understudy outage drill {report['id']}: {report['verdict']}", "",
             f"- Started {started}, ran {report['duration_s']} s of {report['planned_s']:g} s planned, ended by {report['ended_by']}.",
             f"- Scope: {scope}.",
             f"- Covered requests: {report['totals']['requests']}, answered locally {report['totals']['local']}, "
             f"failed {report['totals']['failed']}.",
             f"- Other traffic: {report['other_traffic']['requests']} requests, "
             f"{report['other_traffic']['failed_503']} answered 503 (expected when their upstream is down).", "",
             "| workload | requests | local | failed | p50 | p95 | target p95 | first local answer | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["per_workload"].items():
        lines.append(f"| {name} | {p['requests']} | {p['local']} | {p['failed']} | {_s(p['p50_s'])} | {_s(p['p95_s'])} | "
                     f"{p['target_p95_s']:g} s | {_s(p['first_local_answer_s'])} | {p['verdict']} |")
    if report["queues"]:
        lines += ["", "| local model | slots | peak running | peak waiting | queue limit | headroom (limit - peak waiting) |",
                  "|---|---|---|---|---|---|"]
        for model, q in report["queues"].items():
            slots = q["slots"] or "-"
            lines.append(f"| {model} | {slots} | {q['running'] if q['slots'] else '-'} | {q['waiting']} {q['unit']} | "
                         f"{q['max_waiting']} | {q['headroom']} |")
    lines += ["", "Criteria per covered workload: no failed request, p95 latency (whole answer, as journaled) within its "
              "`target_p95_s`, and at least one answer from the local model.",
              _shadow_line(report["shadow_readiness_before"]), ""]
    return "\n".join(lines)


def _shadow_line(before: dict[str, Any]) -> str:
    if not before:
        return "Shadow readiness before the drill: not measured (no workload has a shadow_rate)."
    parts = [f"{name} {r['readiness'] if r['readiness'] is not None else 'n/a'} ({r['samples']} samples; {r['metric']})"
             for name, r in before.items()]
    return "Shadow readiness before the drill: " + "; ".join(parts) + "."


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"

