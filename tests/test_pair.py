"""A redundant pair: two Understudy boxes behind HAProxy (``deploy/haproxy.cfg``), and the
Kubernetes manifests (``deploy/k8s/``).

The pair test (the slow tier: ``make pair-test``, which sets ``UNDERSTUDY_PAIR_TEST=1``; marked
``pair``) runs two real boxes with the same config (a fake cloud with a covered workload,
``drain_grace_s`` 2 s, ``drain_timeout_s`` 30 s) on two ports, HAProxy with the repository's own
config in front, and 8 streaming clients (the official ``openai`` client, ``max_retries=0`` so
that no failure is hidden by a client retry) in a loop through HAProxy:

- ``kill -9`` of one box under load: every request that box had not started answering is served
  by the other box; the streams it was answering end with an error the client sees (the openai
  client raises), never with a short answer that looks complete;
- a rolling restart (SIGTERM one box, wait for it to exit, start it again, wait until HAProxy
  has it back, then the other): not one failed request;
- the same box with ``drain_grace_s = 0``, so that it refuses (503 ``server_shutting_down``)
  before HAProxy's next check, and a burst sent right after SIGTERM: HAProxy replays every
  refused request on the other box (``retry-on 503`` needs ``option http-buffer-request``:
  without it, 6 of 8 such requests reached the client as 503s);
- the cloud dies: both boxes fail over on their own, and every covered request is answered.

The counts are printed and written to ``.cache/test-artifacts/pair-test.json``. HAProxy comes
from Debian (``make pair-deps``; the test runs it when HAProxy is missing, and skips saying why
when that fails).

The quick tests (in ``make test``) check that HAProxy accepts ``deploy/haproxy.cfg``, that the
manifests hold together (the ConfigMap's ``understudy.toml`` through Understudy's own parser,
the shutdown budget, probes, selectors) and, when ``kubernetes-validate`` is installed, that
each manifest matches the Kubernetes schema.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CHAT_MODEL, ROOT, TEST_CACHE, FakeCloud, free_port

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
K8S = ROOT / "deploy" / "k8s"
ARTIFACTS = Path(os.environ.get("UNDERSTUDY_TEST_ARTIFACTS") or ROOT / ".cache" / "test-artifacts")

GRACE_S, DRAIN_TIMEOUT_S = 2.0, 30.0
CLIENTS = 8
CLOUD_WORDS, CLOUD_CHUNK_S = 40, 0.05  # a cloud stream lasts ~2 s: several are always running
LOCAL_MAX_TOKENS = 16  # local answers (the cloud is down) stay short on 2 cores
COVERED = "triage-model"

_PAIR_MARK = pytest.mark.pair  # registered in pyproject.toml


def pair_test(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in (pytest.mark.timeout(900),
                 pytest.mark.skipif(os.environ.get("UNDERSTUDY_PAIR_TEST") != "1",
                                    reason="the pair test runs with `make pair-test` (UNDERSTUDY_PAIR_TEST=1)"),
                 _PAIR_MARK):
        fn = mark(fn)
    return fn


def haproxy_env(box1: str, box2: str, bind: str, stats: str) -> dict[str, str]:
    env = {**os.environ, "UNDERSTUDY_BOX1": box1, "UNDERSTUDY_BOX2": box2, "UNDERSTUDY_LB_BIND": bind,
           "UNDERSTUDY_LB_STATS_BIND": stats, "UNDERSTUDY_CHECK_HOST": "localhost"}
    if os.geteuid() != 0:
        env["UNDERSTUDY_LB_NO_SETUID"] = "1"  # only root can switch to the haproxy user
    return env


# -- quick checks (make test) ---------------------------------------------------------------------
def test_haproxy_config_says_what_the_readme_says() -> None:
    text = re.sub(r"#.*", "", HAPROXY_CFG.read_text())
    backend = text.split("backend understudy_boxes", 1)[1].split("frontend ", 1)[0]
    lines = {" ".join(line.split()) for line in backend.splitlines() if line.strip()}
    assert "balance leastconn" in lines
    assert "retry-on conn-failure empty-response 503" in lines  # never 500/502/504 or timeouts
    assert "option redispatch 1" in lines and "retries 1" in lines  # one retry, on the other box
    assert "option http-server-close" in lines
    assert any(line.startswith("http-check send meth GET uri /ready ") for line in lines)
    assert "http-check expect status 200" in lines
    assert "default-server check inter 1s fall 1 rise 2" in lines
    assert "on-marked-down" not in backend  # a box leaving the pool keeps its running streams
    assert "compression" not in text  # it would hold SSE chunks back
    timeouts = dict(re.findall(r"^\s*timeout (\S+) (\S+)", text, re.M))
    assert timeouts["server"] == timeouts["client"] == "5m"
    # HAProxy notices a draining box before it stops accepting new requests (README).
    assert 1.0 * 1 + float(timeouts["check"].rstrip("s")) <= 5.0  # inter x fall + timeout check <= default drain_grace_s
    # Replaying a request (503, empty-response) needs all of it in HAProxy's hands when it picks a
    # box; without this, requests whose body came in a second packet were not retried.
    assert "option http-buffer-request" in lines


def test_haproxy_accepts_the_config() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (`make pair-deps` installs it; `make pair-test` runs it)")
    env = haproxy_env("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9000", "127.0.0.1:9003")
    r = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr and "ALERT" not in r.stdout + r.stderr, r.stdout + r.stderr
    env = {k: v for k, v in env.items() if not k.startswith("UNDERSTUDY_BOX")}
    r = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "set UNDERSTUDY_BOX1 and UNDERSTUDY_BOX2" in r.stdout + r.stderr


def k8s_documents() -> list[dict[str, Any]]:
    import yaml

    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_hold_together() -> None:
    from server.config import parse_config

    docs = {d["kind"]: d for d in k8s_documents()}
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    deployment, service, pdb, configmap = docs["Deployment"], docs["Service"], docs["PodDisruptionBudget"], docs["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]

    # The ConfigMap's understudy.toml is a config Understudy accepts, mounted where args say.
    config = parse_config(tomllib.loads(configmap["data"]["understudy.toml"]), Path("/etc/understudy"),
                          env={"OPENAI_API_KEY": "sk-test"})
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    assert container["args"][-2:] == ["--config", f"{mounts[config_volume]['mountPath']}/understudy.toml"]
    assert mounts[config_volume].get("readOnly") is True
    assert str(config.server.state_dir) in {m["mountPath"] for m in mounts.values()}
    assert config.server.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.server.port

    # Probes: ready = serving every model and not draining; live = the process answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}

    # Shutdown budget: preStop (endpoints update) + drain grace + drain timeout, with room to spare.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and not any("kill" in c for c in command)  # the kubelet sends the one SIGTERM
    budget = float(command[1]) + config.server.drain_grace_s + config.server.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= budget + 5, (pod["terminationGracePeriodSeconds"], budget)

    # Keys from the Secret, never in the manifests.
    assert container["envFrom"] == [{"secretRef": {"name": "understudy-keys"}}]
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", "".join(p.read_text() for p in K8S.glob("*.yaml")))

    # The Service and the budget select these pods; one pod at a time goes.
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # The image's non-root user (Dockerfile: USER 10001:10001).
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    assert "nvidia.com/gpu: 1" in (K8S / "deployment.yaml").read_text()  # the GPU variant, commented


def test_k8s_manifests_match_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed: the manifests' schemas are unchecked")
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    for version in (versions[0], versions[-1]):  # the oldest and the newest Kubernetes it knows
        for doc in k8s_documents():
            # strict: an unknown (misspelt) field fails too; raises ValidationError naming the path
            kubernetes_validate.validate(doc, version, strict=True)


# -- the pair (make pair-test) ----------------------------------------------------------------------
def box_config(cloud: FakeCloud, state_dir: Path) -> str:
    return f"""
[server]
state_dir = "{state_dir}"
cache_dir = "{TEST_CACHE}"
drain_grace_s = {GRACE_S}
drain_timeout_s = {DRAIN_TIMEOUT_S}

# Both boxes share this machine's cores (in production each has its own): one llama.cpp thread
# each, or their spinning thread pools starve each other (16 tokens took 30 s with two each).
[models.{CHAT_MODEL}]
threads = 1

[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
api_key_env = "PAIR_CLOUD_KEY"
connect_timeout_s = 1.0
first_byte_timeout_s = 3.0
read_timeout_s = 5.0
probe_interval_s = 1.0
probe_interval_open_s = 0.5
probe_timeout_s = 0.5
failure_threshold = 3

[[workloads]]
name = "triage"
models = ["{COVERED}"]
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "{CHAT_MODEL}"
system_prompt = "You are a careful triage assistant."

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
"""


@dataclass
class Box:
    name: str
    port: int
    folder: Path
    config: str
    process: subprocess.Popen[str] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / f"server-{self.starts}.log"

    def start(self, timeout: float = 180.0) -> float:
        """Start (again, on the same port) and wait for /ready 200; returns the seconds it took."""
        self.starts += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "understudy.toml"
        config_path.write_text(self.config)
        env = {**os.environ, "PAIR_CLOUD_KEY": "sk-pair-test"}
        env.pop("UNDERSTUDY_CONFIG", None)
        args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--config", str(config_path)]
        started = time.monotonic()
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Balancer:
    """HAProxy with deploy/haproxy.cfg, its variables pointing at the two boxes."""

    def __init__(self, folder: Path, boxes: list[Box]) -> None:
        haproxy = shutil.which("haproxy")
        assert haproxy is not None
        self.port, self.stats_port = free_port(), free_port()
        self.log_path = folder / "haproxy.log"
        env = haproxy_env(*(f"127.0.0.1:{b.port}" for b in boxes), f"127.0.0.1:{self.port}", f"127.0.0.1:{self.stats_port}")
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], stdout=log, stderr=subprocess.STDOUT,
                                            text=True, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """HAProxy's view of each box: UP, DOWN, or a transition such as "DOWN 1/2"."""
        r = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2)
        rows = csv.DictReader(io.StringIO(r.text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "understudy_boxes" and row["svname"].startswith("box")}

    def wait_state(self, box: str, want: str, timeout: float = 30.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.states().get(box) == want:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"HAProxy never saw {box} {want} in {timeout} s: {self.states()}")

    def log_since(self, offset: int) -> list[str]:
        with self.log_path.open() as f:
            f.seek(offset)
            return f.read().splitlines()

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Result:
    client: int
    started: float
    headers_at: float | None = None
    ended: float = 0.0
    box: str | None = None
    route: str | None = None
    reason: str | None = None
    outcome: str = ""  # ok (a finish_reason), error (the client raised), truncated (neither: must never happen)
    error: str = ""
    finish_reason: str | None = None
    chunks: int = 0


class Load:
    """``CLIENTS`` threads, each streaming one chat completion after another through HAProxy."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"pair-client-{i}", daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"

    def _run(self, i: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.url + "/v1", api_key="pair-test", max_retries=0, timeout=60.0)
        try:
            while not self._stop.is_set():
                self.results.append(self._one(client, i))
        finally:
            client.close()

    def _one(self, client: Any, i: int) -> Result:
        r = Result(i, time.monotonic())
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=COVERED, messages=[{"role": "user", "content": f"Patient {i}: chest pain since this morning."}],
                max_tokens=self.max_tokens, temperature=0, stream=True)
            r.headers_at = time.monotonic()
            r.box, r.route = raw.headers.get("x-understudy-box"), raw.headers.get("x-understudy-route")
            r.reason = raw.headers.get("x-understudy-fallback-reason")
            for chunk in raw.parse():
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        r.chunks += 1
                    if choice.finish_reason:
                        r.finish_reason = choice.finish_reason
            r.outcome = "ok" if r.finish_reason else "truncated"
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none is hidden
            r.outcome, r.error = "error", f"{type(exc).__name__}: {str(exc)[:160]}"
        r.ended = time.monotonic()
        return r


@dataclass
class Pair:
    cloud: FakeCloud
    boxes: list[Box]
    balancer: Balancer
    report: dict[str, Any] = field(default_factory=dict)

    def box(self, name: str) -> Box:
        return next(b for b in self.boxes if b.name == name)

    def ensure_up(self) -> None:
        self.cloud.set_fault("ok")
        for b in self.boxes:
            if not b.running:
                b.start()
        for b in self.boxes:
            self.balancer.wait_state(b.name, "UP", timeout=60)

    def record(self, phase: str, summary: dict[str, Any], results: list[Result]) -> None:
        self.report[phase] = {**summary, "requests": len(results)}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        detail = {**self.report[phase], "results": [asdict(r) for r in results]}
        (ARTIFACTS / f"pair-test-{phase}.json").write_text(json.dumps(detail, indent=1))
        (ARTIFACTS / "pair-test.json").write_text(json.dumps(self.report, indent=2))
        print(f"\n[pair] {phase}: " + json.dumps(self.report[phase], indent=2), flush=True)


def retries_in(lines: list[str]) -> Counter[str]:
    """HAProxy httplog lines: the retries field (``.../+1``: retried, and on another box) and
    the termination state (``SD``: the server closed during the data phase)."""
    out: Counter[str] = Counter()
    for line in lines:
        m = re.search(r" \d+/\d+/\d+/\d+/(\+?)(\d+) \d+/\d+ ", line)
        if m and int(m.group(2)) > 0:
            out["redispatched" if m.group(1) else "retried_same_box"] += 1
        if re.search(r" SD-- ", line):
            out["server_closed_mid_answer"] += 1
    return out


def check_events(lines: list[str]) -> list[str]:
    """Each box leaving or joining the pool (HAProxy writes each line to its log and to stderr)."""
    events = [re.sub(r"^.*?(Server understudy_boxes/)", r"\1", line)[:110] for line in lines if "Server understudy_boxes/" in line]
    return [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if shutil.which("haproxy") is None:
        r = subprocess.run(["make", "-C", str(ROOT), "pair-deps"], capture_output=True, text=True, timeout=600)
        if shutil.which("haproxy") is None:
            pytest.skip(f"haproxy is not installed and `make pair-deps` could not install it:\n{(r.stdout + r.stderr)[-600:]}")
    t0 = time.monotonic()
    folder = tmp_path_factory.mktemp("pair")
    cloud = FakeCloud(chunk_interval_s=CLOUD_CHUNK_S, script=lambda body: "word " * CLOUD_WORDS).start()
    boxes = [Box(f"box{i}", free_port(), folder / f"box{i}", box_config(cloud, folder / f"box{i}" / "state")) for i in (1, 2)]
    balancer = None
    try:
        for b in boxes:
            print(f"\n[pair] {b.name} ready in {b.start():.1f} s on port {b.port}", flush=True)
        balancer = Balancer(folder, boxes)
        p = Pair(cloud, boxes, balancer)
        p.ensure_up()
        yield p
        p.report["total_s"] = round(time.monotonic() - t0, 1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "pair-test.json").write_text(json.dumps(p.report, indent=2))
        print(f"\n[pair] all phases: {json.dumps(p.report)}", flush=True)
    finally:
        if balancer is not None:
            balancer.stop()
        for b in boxes:
            b.stop()
        cloud.stop()


@pair_test
def test_kill_9_of_one_box_under_load(pair: Pair) -> None:
    pair.ensure_up()
    started = time.monotonic()
    victim, other = pair.box("box1"), pair.box("box2")
    offset = pair.balancer.log_offset()
    with Load(pair.balancer.url, max_tokens=CLOUD_WORDS) as load:
        time.sleep(3.0)
        killed_at = time.monotonic()
        assert victim.process is not None
        victim.process.kill()  # SIGKILL: no drain, no goodbye
        victim.process.wait()
        noticed = pair.balancer.wait_state(victim.name, "DOWN", timeout=10)
        time.sleep(4.0)
    results = load.results
    # Streams the dead box was answering (it had sent their headers: it can't have after it died).
    cut = [r for r in results if r.box == victim.name and r.ended > killed_at]
    # Everything else still going at the kill or started after it: none had been started on the dead box.
    rest = [r for r in results if r.box != victim.name and r.ended > killed_at]
    after = [r for r in rest if r.started > killed_at]
    lines = pair.balancer.log_since(offset)
    served = [r for r in rest if r.outcome == "ok" and r.box == other.name]
    summary = {
        "killed": victim.name,
        "haproxy_noticed_s": round(noticed, 2),
        "streams_running_on_the_dead_box": {
            "count": len(cut),
            "ended_with_a_visible_error": sum(r.outcome == "error" for r in cut),
            "had_already_received_everything": sum(r.outcome == "ok" for r in cut),
            "errors_the_client_raised": dict(Counter(r.error.split(":")[0] for r in cut if r.outcome == "error")),
        },
        "requests_not_started_on_the_dead_box": {
            "count": len(rest),
            "started_after_the_kill": len(after),
            "served_by_the_other_box": len(served),
            "failed": [asdict(r) for r in rest if r.outcome != "ok"][:5],
        },
        "silently_truncated_anywhere": sum(r.outcome == "truncated" for r in results),
        "haproxy": dict(retries_in(lines)),
        "haproxy_checks": check_events(lines),
        "phase_s": round(time.monotonic() - started, 1),
    }
    pair.record("kill9", summary, results)
    assert summary["silently_truncated_anywhere"] == 0
    assert cut, "no stream was running on the killed box: the load is too light to show anything"
    assert all(r.outcome in ("ok", "error") for r in cut)
    assert len(served) == len(rest) > 0, summary["requests_not_started_on_the_dead_box"]["failed"]
    assert len(after) >= CLIENTS


@pair_test
def test_rolling_restart_loses_nothing(pair: Pair) -> None:
    pair.ensure_up()
    started = time.monotonic()
    offset = pair.balancer.log_offset()
    steps: list[dict[str, Any]] = []
    with Load(pair.balancer.url, max_tokens=CLOUD_WORDS) as load:
        time.sleep(3.0)
        for box in pair.boxes:
            assert box.process is not None
            signalled = time.monotonic()
            box.process.send_signal(signal.SIGTERM)
            out_of_pool = pair.balancer.wait_state(box.name, "DOWN", timeout=10)
            code = box.process.wait(timeout=GRACE_S + DRAIN_TIMEOUT_S + 15)
            exited = time.monotonic() - signalled
            assert code == 0, box.log_path.read_text()[-2000:]
            ready = box.start()
            back = pair.balancer.wait_state(box.name, "UP", timeout=30)
            steps.append({"box": box.name, "out_of_pool_s": round(out_of_pool, 2), "exited_s": round(exited, 1),
                          "restarted_ready_s": round(ready, 1), "back_in_pool_s": round(back, 1)})
            time.sleep(2.0)
    results = load.results
    failed = [r for r in results if r.outcome != "ok"]
    lines = pair.balancer.log_since(offset)
    summary = {
        "steps": steps,
        "failed_requests": len(failed),
        "failures": [asdict(r) for r in failed][:10],
        "served_by": dict(Counter(r.box for r in results)),
        "haproxy": dict(retries_in(lines)),
        "haproxy_checks": check_events(lines),
        "phase_s": round(time.monotonic() - started, 1),
    }
    pair.record("rolling_restart", summary, results)
    assert not failed, summary["failures"]
    assert all(summary["served_by"].get(b.name, 0) > 0 for b in pair.boxes)


def burst(url: str, n: int) -> list[Result]:
    """``n`` requests at once (one thread each), as ``Load`` makes them."""
    from openai import OpenAI

    load, out = Load(url, max_tokens=CLOUD_WORDS), []

    def one(i: int) -> None:
        client = OpenAI(base_url=url + "/v1", api_key="pair-test", max_retries=0, timeout=60.0)
        try:
            out.append(load._one(client, 100 + i))
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pair_test
def test_a_box_refusing_before_haproxy_noticed_costs_a_retry_not_a_request(pair: Pair) -> None:
    """``drain_grace_s = 0``: the box refuses new requests (503 ``server_shutting_down``) the moment
    it gets SIGTERM, before HAProxy's next check has taken it out of the pool; a burst sent then
    is partly routed to it, and HAProxy replays each refused request on the other box. The second
    net under a rolling restart whose grace is shorter than the checks."""
    pair.ensure_up()
    started = time.monotonic()
    box = pair.box("box1")
    normal = box.config
    assert box.process is not None
    box.process.send_signal(signal.SIGTERM)
    box.process.wait(timeout=GRACE_S + DRAIN_TIMEOUT_S + 15)
    box.config = normal.replace(f"drain_grace_s = {GRACE_S}", "drain_grace_s = 0")
    try:
        box.start()
        pair.balancer.wait_state(box.name, "UP", timeout=30)
        offset = pair.balancer.log_offset()
        with Load(pair.balancer.url, max_tokens=CLOUD_WORDS) as load:
            time.sleep(3.0)
            box.process.send_signal(signal.SIGTERM)
            sent = burst(pair.balancer.url, CLIENTS)
            out_of_pool = pair.balancer.wait_state(box.name, "DOWN", timeout=10)
            code = box.process.wait(timeout=DRAIN_TIMEOUT_S + 15)
            time.sleep(1.0)
    finally:
        box.config = normal
    assert code == 0
    results = load.results + sent
    failed = [r for r in results if r.outcome != "ok"]
    lines = pair.balancer.log_since(offset)
    summary = {
        "burst_after_sigterm": {"count": len(sent), "served_by": dict(Counter(r.box for r in sent if r.outcome == "ok"))},
        "haproxy_noticed_s": round(out_of_pool, 2),
        "failed_requests": len(failed),
        "failures": [asdict(r) for r in failed][:10],
        "haproxy": dict(retries_in(lines)),
        "haproxy_checks": check_events(lines),
        "phase_s": round(time.monotonic() - started, 1),
    }
    pair.record("refused_then_retried", summary, results)
    assert not failed, summary["failures"]
    assert summary["haproxy"].get("redispatched", 0) > 0, "no request reached the refusing box: nothing was shown"


@pair_test
def test_cloud_death_both_boxes_fail_over(pair: Pair) -> None:
    pair.ensure_up()
    started = time.monotonic()
    offset = pair.balancer.log_offset()
    try:
        with Load(pair.balancer.url, max_tokens=LOCAL_MAX_TOKENS) as load:
            time.sleep(3.0)
            died_at = time.monotonic()
            pair.cloud.set_fault("refuse")
            time.sleep(12.0)
    finally:
        pair.cloud.set_fault("ok")
    results = load.results
    # Cloud streams being relayed when the cloud died: Understudy never splices local text onto a
    # cloud answer, so they end with an error event (upstream_stream_broken) the client sees.
    broken = [r for r in results if r.route == "cloud" and r.ended > died_at]
    rest = [r for r in results if r.ended > died_at and r not in broken]
    after = [r for r in rest if r.started > died_at + 0.5]
    answered = [r for r in rest if r.outcome == "ok"]
    summary = {
        "cloud_streams_cut_by_the_cloud": {
            "count": len(broken),
            "ended_with_a_visible_error": sum(r.outcome == "error" for r in broken),
            "had_already_received_everything": sum(r.outcome == "ok" for r in broken),
            "errors_the_client_raised": dict(Counter(r.error[:60] for r in broken if r.outcome == "error")),
        },
        "covered_requests_after_the_cloud_died": {
            "count": len(rest),
            "answered": len(answered),
            "answered_locally_by": dict(Counter(r.box for r in answered if r.route == "local")),
            "fallback_reasons": dict(Counter(r.reason for r in answered)),
            "failed": [asdict(r) for r in rest if r.outcome != "ok"][:5],
        },
        "silently_truncated_anywhere": sum(r.outcome == "truncated" for r in results),
        "haproxy": dict(retries_in(pair.balancer.log_since(offset))),
        "phase_s": round(time.monotonic() - started, 1),
    }
    pair.record("cloud_death", summary, results)
    assert summary["silently_truncated_anywhere"] == 0
    assert all(r.outcome in ("ok", "error") for r in broken)
    assert len(answered) == len(rest) > 0, summary["covered_requests_after_the_cloud_died"]["failed"]
    assert all(r.route == "local" for r in after)
    by_box = summary["covered_requests_after_the_cloud_died"]["answered_locally_by"]
    assert all(by_box.get(b.name, 0) > 0 for b in pair.boxes)  # each box failed over on its own
