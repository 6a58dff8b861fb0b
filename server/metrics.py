"""``GET /metrics``: Prometheus text format, names ``understudy_*`` with their unit in the name.

Two sources, and no engine's internals:
- ``Metrics.consume``, a ``server.events`` sink: counters and histograms from typed events
  (requests, latency, time to first token, inter-token latency, tokens, failovers, breaker
  transitions, shadow comparisons, drills, admin actions).
- ``StateCollector``, read at scrape time through public, typed accessors: each local model's
  load (``LocalClient.load``: queue depth, running, slots), load state, each upstream's breaker
  state, the router's hedge counters, shadow readiness per workload, process RSS, and per GPU its
  memory, temperature and utilisation (NVML, only when a GPU was found at start).

Labels are configuration names, route and reason codes, never client text: a cloud model that is
not a workload is counted under ``model="cloud"``. Names follow vLLM's and llama-server's where
they overlap (``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``prompt_tokens_total``, ``generation_tokens_total``, ``num_requests_running``/``waiting``).
Event-loop thread for ``consume``; the collector runs in the scrape's handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.box import box_id
from server.events import AdminAction, BreakerChanged, DrillFinished, Event, RouteDone, ShadowCompared

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_TOKEN_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BREAKER_STATES = ("closed", "slow", "open", "half_open")


class Metrics:
    def __init__(self, known_models: set[str], known_workloads: set[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = known_models
        self._workloads = known_workloads
        r = self.registry
        self.requests = Counter("understudy_requests", "Requests answered or refused",
                                ["endpoint", "workload", "route", "status"], registry=r)
        self.latency = Histogram("understudy_request_duration_seconds", "Whole request, first byte in to last byte out",
                                 ["endpoint", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("understudy_time_to_first_token_seconds", "Time to the first content token",
                              ["route", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("understudy_inter_token_latency_seconds", "Mean time between tokens of one answer",
                             ["route", "model"], buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("understudy_prompt_tokens", "Prompt tokens", ["route", "model"], registry=r)
        self.generation_tokens = Counter("understudy_generation_tokens", "Generated tokens", ["route", "model"], registry=r)
        self.failovers = Counter("understudy_failovers", "Covered requests answered locally because of the cloud",
                                 ["upstream", "reason"], registry=r)
        self.breaker = Counter("understudy_breaker_transitions", "Circuit breaker transitions", ["upstream", "to"], registry=r)
        self.shadow = Counter("understudy_shadow_comparisons", "Shadow comparisons by outcome", ["workload", "outcome"], registry=r)
        self.drills = Counter("understudy_drills", "Finished outage drills", ["verdict"], registry=r)
        self.admin = Counter("understudy_admin_actions", "Operator actions", ["action"], registry=r)

    def _model(self, name: str | None) -> str:
        return name if name in self._models else ("cloud" if name else "none")

    def _workload(self, name: str | None) -> str:
        return name if name in self._workloads else "none"

    def consume(self, ev: Event) -> None:
        if isinstance(ev, RouteDone):
            model = self._model(ev.model) if ev.route == "local" else ("cloud" if ev.route == "cloud" else "none")
            self.requests.labels(ev.endpoint, self._workload(ev.workload), ev.route, str(ev.status)).inc()
            self.latency.labels(ev.endpoint, ev.route).observe(ev.latency_ms / 1000)
            if ev.ttft_ms is not None:
                self.ttft.labels(ev.route, model).observe(ev.ttft_ms / 1000)
            if ev.itl_ms is not None:
                self.itl.labels(ev.route, model).observe(ev.itl_ms / 1000)
            if ev.prompt_tokens:
                self.prompt_tokens.labels(ev.route, model).inc(ev.prompt_tokens)
            if ev.completion_tokens:
                self.generation_tokens.labels(ev.route, model).inc(ev.completion_tokens)
            if ev.route == "local" and ev.reason and ev.upstream:
                self.failovers.labels(ev.upstream, ev.reason).inc()
        elif isinstance(ev, BreakerChanged):
            self.breaker.labels(ev.upstream, ev.new).inc()
        elif isinstance(ev, ShadowCompared):
            self.shadow.labels(ev.workload, ev.outcome).inc()
        elif isinstance(ev, DrillFinished):
            self.drills.labels(ev.verdict).inc()
        elif isinstance(ev, AdminAction):
            self.admin.labels(ev.action).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def cached(read: Callable[[], Any], max_age_s: float) -> Callable[[], Any]:
    """``read()`` at most every ``max_age_s`` (NVML's init/query/shutdown costs milliseconds, up
    to seconds without persistence mode: a scrape must not stall the streams on the loop)."""
    state: dict[str, Any] = {"at": float("-inf"), "value": None}

    def get() -> Any:
        now = time.monotonic()
        if now - state["at"] >= max_age_s:
            state["value"], state["at"] = read(), now
        return state["value"]

    return get


class StateCollector(Collector):
    """Gauges read at scrape time. ``models``: (id, state) pairs; ``load``: ``LocalClient.load``;
    ``breakers``: (upstream, state); ``hedges``: the router's counters; ``readiness``: shadow
    mode's per workload; ``gpus``: a callable returning ``hardware.nvml.GpuStatus`` or None."""

    def __init__(self, models: Callable[[], list[tuple[str, str]]], load: Callable[[str], Any],
                 breakers: Callable[[], list[tuple[str, str]]], hedges: Callable[[], dict[str, int]],
                 readiness: Callable[[], dict[str, Any]], gpus: Callable[[], Any] | None = None) -> None:
        self._models, self._load, self._breakers = models, load, breakers
        self._hedges, self._readiness, self._gpus = hedges, readiness, gpus
        self._process = psutil.Process()

    def describe(self) -> list[Any]:
        return []  # no fixed description: the families are built per scrape

    def collect(self) -> Iterator[Any]:
        info = GaugeMetricFamily("understudy_box_info", "This box's name (UNDERSTUDY_BOX_ID or the host name)", labels=["box"])
        info.add_metric([box_id()], 1.0)
        yield info
        running = GaugeMetricFamily("understudy_num_requests_running", "Requests decoding now", labels=["model"])
        waiting = GaugeMetricFamily("understudy_num_requests_waiting", "Requests (or embedding inputs) queued",
                                    labels=["model"])
        slots = GaugeMetricFamily("understudy_slots", "Sequences a model decodes together", labels=["model"])
        ready = GaugeMetricFamily("understudy_model_ready", "1 when the model is loaded and serving", labels=["model", "state"])
        kv = GaugeMetricFamily("understudy_kv_cache_usage_ratio", "Share of the KV cache in use", labels=["model"])
        for model_id, state in self._models():
            ready.add_metric([model_id, state], 1.0 if state == "ready" else 0.0)
            load = self._load(model_id)
            if load is not None:
                running.add_metric([model_id], load.running)
                waiting.add_metric([model_id], load.waiting)
                slots.add_metric([model_id], load.slots)
                if load.kv_capacity:
                    kv.add_metric([model_id], load.kv_used / load.kv_capacity)
        yield from (running, waiting, slots, ready, kv)
        breaker = GaugeMetricFamily("understudy_breaker_state", "1 for the breaker's current state", labels=["upstream", "state"])
        for name, state in self._breakers():
            for s in BREAKER_STATES:
                breaker.add_metric([name, s], 1.0 if s == state else 0.0)
        yield breaker
        hedges = self._hedges()
        yield CounterMetricFamily("understudy_covered_cloud_attempts", "Covered requests sent to the cloud",
                                  value=hedges.get("covered_cloud_attempts", 0))
        outcome = CounterMetricFamily("understudy_hedges", "Hedged requests (local started beside a late cloud)",
                                      labels=["outcome"])
        won = hedges.get("hedges_won_by_local", 0)
        outcome.add_metric(["local_won"], won)
        outcome.add_metric(["cloud_won"], max(0, hedges.get("hedged", 0) - won))
        yield outcome
        readiness = GaugeMetricFamily("understudy_shadow_readiness_ratio", "Local readiness from shadow mode (last day)",
                                      labels=["workload"])
        for workload, entry in self._readiness().items():
            if entry.get("readiness") is not None:
                readiness.add_metric([workload], float(entry["readiness"]))
        yield readiness
        try:
            rss = float(self._process.memory_info().rss)
        except psutil.Error:
            rss = float("nan")
        yield GaugeMetricFamily("understudy_process_resident_memory_bytes", "Resident memory of the server", value=rss)
        status = self._gpus() if self._gpus is not None else None
        if status is not None and status.gpus:
            used = GaugeMetricFamily("understudy_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            temp = GaugeMetricFamily("understudy_gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
            util = GaugeMetricFamily("understudy_gpu_utilization_ratio", "GPU busy share", labels=["gpu"])
            for g in status.gpus:
                label = [str(g.index)]
                if getattr(g, "memory_used_bytes", None) is not None:
                    used.add_metric(label, g.memory_used_bytes)
                if getattr(g, "temperature_c", None) is not None:
                    temp.add_metric(label, g.temperature_c)
                if getattr(g, "utilization_gpu_pct", None) is not None:
                    util.add_metric(label, g.utilization_gpu_pct / 100)
            yield from (used, temp, util)
