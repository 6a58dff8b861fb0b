#!/usr/bin/env python3
"""Hardware benchmark: what can this box take over, and how many requests a minute?

    .venv/bin/python scripts/bench.py --quick                 # about 4-5 minutes on 2 cores
    .venv/bin/python scripts/bench.py                         # the full run, 20-40 minutes
    .venv/bin/python scripts/bench.py --config understudy.toml --write-config tuned.toml
    understudy bench --quick                                  # the same, from the CLI

What it does, one stage after the other (never two measurements at once on the box):
1. **The served defaults.** ``understudy serve`` with ``--config BASE`` (or the embedded default):
   ``GET /admin/hardware`` (hardware, engines, warnings, each model's settings) and the covered
   workloads of the config.
2. **Serving sweep**: closed-loop streaming chat at each concurrency level
   (``bench_serving.run_level``): aggregate tok/s, TTFT and inter-token latency percentiles.
3. **Capacity per covered workload**: the highest request rate whose p95 latency stays within the
   workload's ``target_p95_s`` with at least 99 % of the requests answered, found by a bounded
   search with open-loop Poisson arrivals (sent on a schedule whatever the replies; fixed seed).
   Triage is measured end to end on ``/v1/triage``; a summaries workload on ``/v1/summarize``
   (streamed) to its first sentence; another chat workload to its first token. Written to
   ``results.json`` and to ``<state_dir>/capacity.json`` (``understudy drill --synthetic last``).
4. **Engine sweeps**, in this process, through the project's own runners (no HTTP): each GGUF
   chat model's prompt-processing and generation tok/s over threads and batch sizes
   (``LlamaRunner``; one runner alive at a time, every decode from this one thread: libgomp keeps
   a worker pool per thread that ever decoded), each ONNX embedding model's embeddings/s over
   threads and batch sizes (``OnnxEmbedder``), each classifier's classifications/s over batch
   sizes (``Classifier`` with its cached head, over an in-process embedder).
5. **Tuned settings**: a value differs from the served default only where its sweep measured at
   least 5 % more than the default's own figure in the same run, and again when both points are
   measured once more back to back (a shared box's bursts must not pick a setting).
   ``--write-config FILE`` writes them as a TOML fragment for ``understudy serve --config FILE``.
   A **validation** stage then runs the defaults and the tuned settings side by side (two
   servers, alternating, 2-3 rounds): aggregate tok/s at 8 streaming clients and ``/v1/triage``
   classifications/s at 32 clients (the triage example messages). If the tuned settings serve
   slower than the defaults beyond the 5 % noise, the written config keeps the defaults.
6. **Outputs** in ``--out`` (default ``bench-results/<host>-<date>/``): ``results.json``,
   ``report.md`` and PNG plots. ``results.json`` is written last, by rename: a crash never leaves
   one that looks complete (``results.partial.json`` holds the stages done so far).

The load generator runs on this same box: on 2 cores, its CPU is part of every figure, so the
capacities are conservative. CPU used by other processes meanwhile is measured per stage; a stage
where they took more than 15 % of the box is flagged in the report (its figures are unreliable).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as _dt
import gc
import json
import math
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GAIN = 0.05
"""A tuned value must beat the default's own figure by this much, in the same run."""
MIN_STREAM_TOK_S = 10.0
"""A batch size is a candidate for ``slots`` only if each sequence still streams this fast."""
FRAGMENT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("threads", "slots", "kv_tokens", "batch_tokens", "max_waiting"),
    "embedding": ("threads", "max_batch_requests", "max_waiting"),
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"batches": [1, 8], "embed_batches": [1, 32], "levels": [1, 8], "seconds": 10.0, "engine_seconds": 2.0,
              "capacity_steps": 3, "validation_rounds": 2, "validation_seconds": 5.0},
    "full": {"batches": [1, 4, 8, 16], "embed_batches": [1, 8, 32], "levels": [1, 2, 4, 8, 16, 32], "seconds": 30.0,
             "engine_seconds": 6.0, "capacity_steps": 6, "validation_rounds": 3, "validation_seconds": 20.0},
}
GEN_TOKENS = 64
"""Tokens generated per sequence and round in the generation sweep (as the serving benchmark's max_tokens)."""
PP_TOKENS = 512
"""Prompt length of the prompt-processing sweep."""
SUCCESS_SHARE = 0.99
VALIDATION_CHAT_CLIENTS = 8
VALIDATION_TRIAGE_CLIENTS = 32


class UsageError(Exception):
    """Bad input, found before anything is measured or written: exit status 2."""


class BenchError(Exception):
    """The benchmark could not complete: exit status 1."""


# -- arguments -------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``understudy bench``, ``server/cli_bench.py``)."""
    parser.add_argument("--quick", action="store_true",
                        help="small sweeps and short steps (under 6 minutes on 2 cores); default: the full run")
    parser.add_argument("--out", type=Path, help="output folder (default: bench-results/<hostname>-<YYYY-MM-DD>/)")
    parser.add_argument("--config", type=Path, metavar="BASE",
                        help="your config: every server the benchmark starts uses it (default: $UNDERSTUDY_CONFIG, "
                             "else the embedded default); capacity.json goes to its state_dir")
    parser.add_argument("--write-config", type=Path, metavar="FILE",
                        help="write the tuned engine settings as a TOML fragment for `understudy serve --config FILE`")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --write-config FILE")
    expert = parser.add_argument_group("overrides (tests, experts); the served defaults are always measured too")
    expert.add_argument("--threads", type=_int_list, help="thread counts of the engine sweeps (quick: 1,<cores>; full: 1..<cores>)")
    expert.add_argument("--batches", type=_int_list, help="sequences decoded together, chat sweep (quick: 1,8; full: 1,4,8,16)")
    expert.add_argument("--embed-batches", type=_int_list, help="inputs per batch, embedding and triage sweeps (quick: 1,32; full: 1,8,32)")
    expert.add_argument("--levels", type=_int_list, help="concurrency levels of the serving sweep (quick: 1,8; full: 1,2,4,8,16,32)")
    expert.add_argument("--seconds", type=_positive(float), help="seconds per serving level and capacity step (quick 10, full 30)")
    expert.add_argument("--engine-seconds", type=_positive(float), help="seconds per engine sweep point (quick 2, full 6)")
    expert.add_argument("--capacity-steps", type=_positive(int), help="steps of each capacity search (quick 3, full 6)")
    expert.add_argument("--validation-rounds", type=_positive(int), help="interleaved rounds of the validation (quick 2, full 3)")
    expert.add_argument("--validation-seconds", type=_positive(float), help="seconds per validation measurement (default: --seconds, else quick 6, full 20)")
    expert.add_argument("--skip-validation", action="store_true", help="do not run the defaults-vs-tuned validation")
    expert.add_argument("--max-tokens", type=_positive(int), default=64, help="completion tokens per streamed chat request (64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "scripts/bench.py") -> int:
    args = build_parser().parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    return run(args, " ".join(shlex.quote(w) for w in [prog, *words]))


# -- small helpers ---------------------------------------------------------------------------------

def cpu_model_name() -> str:
    """The CPU's name as ``lscpu`` prints it (``Model name``), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write(path: Path, data: str | bytes, overwrite: bool = True) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename. With
    ``overwrite=False`` an existing file is never replaced (``FileExistsError``)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: never clobbers a file created meanwhile
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _fmt_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _g(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


# -- TOML ------------------------------------------------------------------------------------------

from server.toml_write import toml_key, toml_value  # noqa: E402


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_dumps(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """A small TOML writer for config data: scalars first, then sub-tables and arrays of tables."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        path = (*prefix, k)
        if isinstance(v, dict):
            head = ".".join(toml_key(p) for p in path)
            out += f"\n[{head}]\n" + toml_dumps(v, path)
        elif _is_table_array(v):
            head = ".".join(toml_key(p) for p in path)
            for item in v:
                out += f"\n[[{head}]]\n" + "\n".join(f"{toml_key(ik)} = {toml_value(iv)}" for ik, iv in item.items()) + "\n"
    return out


_PATH_KEYS = ("path", "tokenizer", "examples", "red_flags_file")
_SERVER_KEYS_KEPT = ("embedded_models",)
"""The ``[server]`` keys of BASE the benchmark's own servers take: what is served. The others
(address, TLS, keys, state and log settings) are the benchmark's: a private loopback server with
its own state folder and no API keys."""
_KEY_ENV = ("UNDERSTUDY_API_KEYS", "UNDERSTUDY_ADMIN_KEY", "UNDERSTUDY_METRICS_KEY")


def server_config_text(base: dict[str, Any], base_dir: Path, overrides: dict[str, dict[str, Any]]) -> str:
    """The body that ``bench_serving.launch_understudy`` appends after its own ``[server]`` lines:
    the user's config (BASE) with relative paths resolved against its folder, the keys the
    benchmark sets itself removed, and ``overrides`` (``{model_id: {key: value}}``) merged in."""
    import tomllib

    data = copy.deepcopy(base)
    server = {k: v for k, v in (data.pop("server", None) or {}).items() if k in _SERVER_KEYS_KEPT}
    models = data.setdefault("models", {})
    for table in models.values():
        if isinstance(table, dict):
            for key in _PATH_KEYS:
                if isinstance(table.get(key), str) and not os.path.isabs(table[key]):
                    table[key] = str((base_dir / table[key]).resolve())
    for model_id, values in overrides.items():
        models.setdefault(model_id, {}).update(values)
    if not models:
        data.pop("models")
    # Bare keys first: they land in launch_understudy's [server] table.
    text = toml_dumps(server) + toml_dumps(data)
    tomllib.loads("[server]\n" + text)  # what we write must parse
    return text


# -- preflight -------------------------------------------------------------------------------------

@dataclass
class Setup:
    base_path: Path | None
    base_data: dict[str, Any]
    base_dir: Path
    config: Any
    """``server.config.Config`` of BASE."""
    out: Path
    write_config: Path | None
    pinned: dict[str, dict[str, Any]]
    """Fragment keys that BASE sets explicitly, per model (kept as they are)."""
    profile: dict[str, Any]
    created_out: list[Path] = field(default_factory=list)


def _check_creatable(path: Path, what: str) -> None:
    """Raise ``UsageError`` unless ``path`` is a writable folder or can be created as one; creates nothing."""
    p = path.absolute()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{what} {path}: exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {path}: the folder is not writable")
        return
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{what} {path}: cannot be created, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot be created, {ancestor} is not writable")


def _create_out(path: Path) -> list[Path]:
    """Create the output folder and prove a file can be written there; returns the folders created."""
    p = path.absolute()
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        q = q.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".bench-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        for d in missing:
            try:
                d.rmdir()
            except OSError:
                pass
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return missing


def _model_kind(spec: Any) -> str | None:
    from models.catalog import ModelFormat, ModelKind

    if spec.kind is ModelKind.CHAT and spec.format is ModelFormat.GGUF:
        return "chat"
    if spec.kind is ModelKind.EMBEDDING and spec.format is ModelFormat.ONNX:
        return "embedding"
    return None


def hardware_defaults(specs: dict[str, Any], model_id: str, hw: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings the server's own plan gives ``model_id`` on this hardware (``models.sizing.plan_for``,
    what the registry applies: the cores and memory shared with the other models), without loading
    any weights, ignoring what the config sets for the tuned keys; ``overrides`` as a config would give them."""
    from dataclasses import replace

    from models.capabilities import engine_caps
    from models.sizing import plan_for

    spec = specs[model_id]
    kind = _model_kind(spec)
    cleared = {k: None for k in FRAGMENT_KEYS[kind]} if kind else {}  # the machine's defaults, not the config's pins
    spec = replace(spec, options=replace(spec.options, **{**cleared, **(overrides or {})}))
    planned = plan_for([spec if s.id == model_id else s for s in specs.values()], hw, engine_caps()).get(model_id)
    if planned is None or planned.refused or not planned.settings:
        raise UsageError(f"{model_id}: the plan gives it no settings ({planned.refused if planned else 'not planned'})")
    return planned.settings


def preflight(args: argparse.Namespace) -> Setup:
    """Every check that needs no measurement, before anything is written."""
    import tomllib

    from server.config import ConfigError, load_config

    base_path = args.config
    if base_path is None and os.environ.get("UNDERSTUDY_CONFIG"):
        base_path = Path(os.environ["UNDERSTUDY_CONFIG"])
    try:
        config = load_config(base_path)
    except ConfigError as exc:
        raise UsageError(f"config error: {exc}") from None
    base_data: dict[str, Any] = tomllib.loads(base_path.read_text()) if base_path is not None else {}
    base_dir = base_path.resolve().parent if base_path is not None else Path.cwd()

    out = args.out or Path("bench-results") / f"{socket.gethostname()}-{_dt.date.today().isoformat()}"
    _check_creatable(out, "--out")

    from models.integrity import verify

    for spec in config.models:
        result = verify(spec)
        if not result.ok:
            raise UsageError(f"model {spec.id} cannot load, so the box cannot be measured with this config: {result.message}")

    models_raw = base_data.get("models") or {}
    pinned: dict[str, dict[str, Any]] = {}
    for spec in config.models:
        kind = _model_kind(spec)
        table = models_raw.get(spec.id) if isinstance(models_raw, dict) else None
        if kind is not None and isinstance(table, dict):
            keys = {k: table[k] for k in FRAGMENT_KEYS[kind] if k in table}
            if keys:
                pinned[spec.id] = keys

    write_config = args.write_config
    if write_config is not None:
        if write_config.exists() and not args.force:
            raise UsageError(f"--write-config {write_config}: the file exists; pass --force to overwrite it")
        if write_config.is_dir():
            raise UsageError(f"--write-config {write_config}: is a folder")
        _check_creatable(write_config.absolute().parent, f"--write-config {write_config}: its folder")
        if pinned:
            # The fragment sets every tuned key of each model. A key BASE sets too can only be
            # merged (`serve --config BASE --config FILE`) if both say the same: the sweep then
            # keeps it. A different value is a conflict the merge would refuse: say so now.
            from hardware.detect import detect

            hw = detect()
            specs = {s.id: s for s in config.models}
            for model_id, keys in pinned.items():
                defaults = hardware_defaults(specs, model_id, hw)
                for key, value in keys.items():
                    if defaults.get(key) != value:
                        raise UsageError(
                            f"--config {base_path} sets [models.{model_id}] {key} = {value!r}, and the tuned fragment would "
                            f"set {key} = {defaults.get(key)!r} (this machine's default): the two configs conflict; remove "
                            f"{key} from {base_path} or run without --write-config")

    profile = dict(PROFILES["quick" if args.quick else "full"])
    for key in ("batches", "embed_batches", "levels", "seconds", "engine_seconds", "capacity_steps", "validation_rounds"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    if args.validation_seconds is not None:
        profile["validation_seconds"] = args.validation_seconds
    elif args.seconds is not None:
        profile["validation_seconds"] = args.seconds
    profile["threads"] = args.threads
    created = _create_out(out)
    return Setup(base_path, base_data, base_dir, config, out, write_config, pinned, profile, created)


# -- workloads -------------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    kind: str
    """``triage`` (a classifier: /v1/triage, end to end), ``summaries`` (/v1/summarize streamed,
    to the first sentence) or ``chat`` (the local chat model, streamed, to the first token)."""
    target_p95_s: float
    local_model: str
    path: str
    metric: str
    """``end-to-end`` or ``first token``."""
    closed_clients: int
    inputs: list[str]
    system_prompt: str | None = None

    def body(self, i: int, rng: random.Random) -> dict[str, Any]:
        text = rng.choice(self.inputs)
        if self.kind == "triage":
            return {"model": self.name, "input": text}
        if self.kind == "summaries":
            return {"model": self.name, "input": text, "stream": True}
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            [{"role": "user", "content": text}]
        return {"model": self.local_model, "messages": messages, "max_tokens": 64, "temperature": 0, "stream": True}


def covered_workloads(config: Any, ready: set[str]) -> tuple[list[Workload], list[str]]:
    """The covered (fallback = local) workloads whose local model is loaded, with their inputs:
    the same example inputs as ``understudy drill --synthetic`` sends."""
    from models.catalog import ModelKind
    from server.cli_drill import _examples

    examples = _examples()
    kinds = {s.id: s.kind for s in config.models}
    out: list[Workload] = []
    skipped: list[str] = []
    for wl in config.workloads:
        if not wl.covered or wl.local_model is None:
            continue
        if wl.local_model not in ready:
            skipped.append(f"{wl.name} (local model {wl.local_model} not loaded)")
            continue
        if kinds.get(wl.local_model) is ModelKind.CLASSIFIER:
            out.append(Workload(wl.name, "triage", wl.target_p95_s or 1.0, wl.local_model, "/v1/triage", "end-to-end", 32,
                                examples["triage"] or examples["other"]))
        elif wl.summary_method is not None:
            out.append(Workload(wl.name, "summaries", wl.target_p95_s or 5.0, wl.local_model, "/v1/summarize", "first sentence", 4,
                                examples["summaries"] or examples["other"]))
        elif kinds.get(wl.local_model) is ModelKind.CHAT:
            out.append(Workload(wl.name, "chat", wl.target_p95_s or 5.0, wl.local_model, "/v1/chat/completions", "first token", 8,
                                examples["other"], wl.system_prompt))
        else:
            skipped.append(f"{wl.name} (local model {wl.local_model} is neither a classifier, a summariser nor a chat model)")
    return out, skipped


def _track_summary_sentences() -> None:
    """``loadgen`` times the content events of chat streams; ``/v1/summarize`` streams
    ``summary.sentence`` events instead: time the first one as the stream's first token."""
    import loadgen

    if getattr(loadgen._on_event, "_bench", False):
        return
    original = loadgen._on_event

    def on_event(reply: Any, event: bytes) -> None:
        original(reply, event)
        if not reply.token_times and b'"summary.sentence"' in event:
            reply.token_times.append(time.perf_counter())

    on_event._bench = True  # type: ignore[attr-defined]
    loadgen._on_event = on_event


def _latency(reply: Any, since: float, metric: str) -> float | None:
    """Seconds from ``since`` to the reply's end (or first token); None for a miss."""
    if reply.status != 200 or reply.error_event:
        return None
    if metric == "end-to-end":
        return reply.ended - since
    return reply.token_times[0] - since if reply.token_times else None


async def closed_loop(url: str, wl: Workload, concurrency: int, duration: float, seed: int) -> float:
    """Requests/s answered by ``concurrency`` clients sending back to back (the search's start)."""
    from urllib.parse import urlparse

    from loadgen import Connection

    u = urlparse(url)
    rng = random.Random(seed)
    done = 0

    async def client(stop_at: float) -> None:
        nonlocal done
        conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
        try:
            while time.perf_counter() < stop_at:
                r = await conn.request("POST", wl.path, wl.body(done, rng))
                if _latency(r, r.started, wl.metric) is not None:
                    done += 1
        finally:
            await conn.close()

    warm = Connection(u.hostname or "127.0.0.1", u.port or 80)
    await warm.request("POST", wl.path, wl.body(0, rng))
    await warm.close()
    start = time.perf_counter()
    await asyncio.gather(*[client(start + duration) for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


async def open_loop(url: str, wl: Workload, rate: float, duration: float, seed: int, timeout: float,
                    max_in_flight: int = 1024) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second for ``duration`` s, sent on schedule whatever the
    replies (latency counts from the scheduled time, so a late send is the box's delay too).
    A failure, a 429/503, a reply after ``timeout`` s or a send over ``max_in_flight`` is a miss."""
    from urllib.parse import urlparse

    from bench_serving import pct
    from loadgen import Connection

    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    arrivals = random.Random(seed)
    bodies = random.Random(seed + 1)
    pool: list[Connection] = []
    latencies: list[float] = []
    misses: dict[str, int] = {}
    in_flight = 0

    def miss(why: str) -> None:
        misses[why] = misses.get(why, 0) + 1

    async def one(i: int, scheduled: float) -> None:
        nonlocal in_flight
        conn = pool.pop() if pool else Connection(host, port)
        in_flight += 1
        try:
            reply = await asyncio.wait_for(conn.request("POST", wl.path, wl.body(i, bodies)), timeout)
        except asyncio.TimeoutError:
            await conn.close()
            miss("timeout")
            return
        finally:
            in_flight -= 1
        latency = _latency(reply, scheduled, wl.metric)
        if latency is None:
            miss(str(reply.status) if reply.status > 0 else "connection")
        else:
            latencies.append(latency)
        if reply.status > 0:
            pool.append(conn)
        else:
            await conn.close()

    times: list[float] = []
    t = 0.0
    while True:
        t += arrivals.expovariate(rate)
        if t >= duration and (len(times) >= 3 or t >= 3 * duration):
            break
        times.append(t)
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for i, at in enumerate(times):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= max_in_flight:
            miss("client_cap")
            continue
        tasks.append(asyncio.create_task(one(i, start + at)))
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    for conn in pool:
        await conn.close()
    sent = len(times)
    failed = sum(misses.values())
    everything = latencies + [math.inf] * failed
    p95_all = pct(everything, 95) if everything else math.inf
    ok_share = len(latencies) / sent if sent else 0.0
    return {
        "rate_per_s": rate, "rate_per_min": rate * 60, "seconds": sent_s, "sent": sent, "ok": len(latencies),
        "misses": misses, "ok_share": ok_share,
        "p50_s": pct(latencies, 50) if latencies else None, "p95_s": pct(latencies, 95) if latencies else None,
        "p99_s": pct(latencies, 99) if latencies else None,
        "passed": bool(sent) and ok_share >= SUCCESS_SHARE and p95_all <= wl.target_p95_s,
    }


def capacity_search(url: str, wl: Workload, steps: int, seconds: float, seed: int,
                    on_step: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The highest open-loop rate that passes (p95 within target, >= 99 % answered) in ``steps`` tries:
    0.8 × the closed-loop throughput first, then up by 1.25× after a pass until a step fails, then
    geometric bisection between the best pass and the lowest failure."""
    closed = asyncio.run(closed_loop(url, wl, wl.closed_clients, max(2.0, seconds / 2), seed))
    on_step({"closed_loop": closed})
    rate = max(closed * 0.8, 0.05)
    lo: dict[str, Any] | None = None
    hi: float | None = None
    tried: list[dict[str, Any]] = []
    timeout = max(5.0, 2 * wl.target_p95_s)  # a reply later than twice the target is a miss
    for k in range(steps):
        step = asyncio.run(open_loop(url, wl, rate, seconds, seed + 100 * k, timeout))
        tried.append(step)
        on_step(step)
        if step["passed"]:
            if lo is None or rate > lo["rate_per_s"]:
                lo = step
            rate = rate * 1.25 if hi is None else math.sqrt(rate * hi)
        else:
            hi = rate if hi is None else min(hi, rate)
            rate = math.sqrt(lo["rate_per_s"] * hi) if lo is not None else rate / 2
        time.sleep(0.5)  # let requests cut by a timeout leave the engines
    best = lo
    return {
        "workload": wl.name, "kind": wl.kind, "endpoint": wl.path, "metric": wl.metric, "target_p95_s": wl.target_p95_s,
        "closed_loop_per_s": closed, "closed_loop_clients": wl.closed_clients, "steps": tried,
        "rate_per_min": int(best["rate_per_s"] * 60) if best else 0, "p95_s": best["p95_s"] if best else None,
        "sustained": best is not None,
        "lower_bound": hi is None,
    }


# -- engine sweeps (in process, this thread only) --------------------------------------------------

def _note_text() -> str:
    notes = sorted((ROOT / "models" / "data" / "summaries" / "notes").glob("*.txt"))
    text = "\n".join(p.read_text() for p in notes)
    return text or ("The patient was admitted with chest pain and shortness of breath. " * 200)


def sweep_chat(spec: Any, gpu_layers: int, threads: list[int], batches: list[int], seconds: float, batch_tokens: int,
               tick: Callable[[str], None], measure_prompt: bool = True) -> dict[str, Any]:
    """Prompt processing (one sequence, ``PP_TOKENS`` tokens in ``batch_tokens`` chunks) and generation
    (B greedy sequences decoded together, ``GEN_TOKENS`` tokens each per round) for each thread
    count × batch size, through ``LlamaRunner.run``, the server engine's own step. One runner
    at a time (closed before the next), every decode from the calling thread."""
    from bench_serving import PROMPTS
    from models.llama_runner import LlamaModel, LlamaRunner
    from models.scheduler import ScheduledChunk, SchedulerOutput
    from models.sequence import SamplingParams, Sequence, SequenceStatus

    greedy = SamplingParams(temperature=0.0)
    model = LlamaModel(spec.path, gpu_layers=gpu_layers)
    rows: list[dict[str, Any]] = []
    try:
        prompts = [model.tokenize(model.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
        long_prompt = model.tokenize(_note_text())[:PP_TOKENS]
        per_slot = max(PP_TOKENS + 8, max(len(p) for p in prompts) + GEN_TOKENS + 8)
        for t in threads:
            for b in batches:
                runner = LlamaRunner(model, num_slots=b, kv_tokens=b * per_slot, batch_tokens=batch_tokens, threads=t, kv_unified=False)
                try:
                    runner.warm_up()
                    pp = _prompt_rate(runner, long_prompt, batch_tokens, seconds / 3, greedy) if measure_prompt and b == batches[0] else None
                    gen, step_ms = _gen_rate(runner, prompts, b, batch_tokens, seconds, greedy, ScheduledChunk, SchedulerOutput,
                                             Sequence, SequenceStatus)
                finally:
                    runner.close()
                rows.append({"threads": t, "batch": b, "gen_tok_s": gen, "per_seq_tok_s": gen / b, "step_ms": step_ms,
                             "pp_tok_s": pp})
                tick(f"{spec.id}: {t} threads, {b} sequences: {gen:.0f} tok/s" + (f", prompt {pp:.0f} tok/s" if pp else ""))
    finally:
        model.close()
    return {"rows": rows, "prompt_tokens": PP_TOKENS, "gen_tokens": GEN_TOKENS, "batch_tokens": batch_tokens}


def _prompt_rate(runner: Any, tokens: list[int], batch_tokens: int, seconds: float, greedy: Any) -> float:
    from models.scheduler import ScheduledChunk, SchedulerOutput
    from models.sequence import Sequence

    done = 0
    spent = 0.0
    reps = 0
    deadline = time.perf_counter() + seconds
    while reps < 1 or time.perf_counter() < deadline:
        runner.clear_slot(0)
        seq = Sequence(list(tokens), 1, greedy)
        seq.slot = 0
        t0 = time.perf_counter()
        pos = 0
        while pos < len(tokens):
            n = min(batch_tokens, len(tokens) - pos)
            runner.run(SchedulerOutput(chunks=[ScheduledChunk(seq, pos, n, pos + n == len(tokens))]))
            pos += n
        spent += time.perf_counter() - t0
        done += len(tokens)
        reps += 1
    runner.clear_slot(0)
    return done / spent


def _gen_rate(runner: Any, prompts: list[list[int]], b: int, batch_tokens: int, seconds: float, greedy: Any,
              ScheduledChunk: Any, SchedulerOutput: Any, Sequence: Any, SequenceStatus: Any) -> tuple[float, float]:
    decoded = 0
    spent = 0.0
    steps = 0
    rounds = 0
    deadline = time.perf_counter() + seconds
    while rounds < 1 or time.perf_counter() < deadline:
        seqs = []
        for i in range(b):
            seq = Sequence(list(prompts[(i + rounds) % len(prompts)]), GEN_TOKENS, greedy)
            seq.slot = i
            seq.status = SequenceStatus.RUNNING
            runner.clear_slot(i)
            seqs.append(seq)
        # Prefill (not timed), in batches of at most batch_tokens tokens.
        group: list[Any] = []
        for seq in [*seqs, None]:
            if seq is None or (group and sum(s.num_prompt_tokens for s in group) + seq.num_prompt_tokens > batch_tokens):
                out = runner.run(SchedulerOutput(chunks=[ScheduledChunk(s, 0, s.num_prompt_tokens, True) for s in group]))
                for s in group:
                    s.output_tokens.append(out[s.seq_id])
                    s.num_computed = s.num_prompt_tokens
                group = []
            if seq is not None:
                group.append(seq)
        t0 = time.perf_counter()
        done = 0
        for _ in range(GEN_TOKENS - 1):  # a round ends early past the deadline (a slow box), after 8 steps
            out = runner.run(SchedulerOutput(chunks=[ScheduledChunk(s, s.num_computed, 1, True) for s in seqs]))
            for s in seqs:
                s.num_computed += 1
                s.output_tokens.append(out[s.seq_id])
            done += 1
            if done >= 8 and time.perf_counter() > deadline:
                break
        spent += time.perf_counter() - t0
        decoded += b * done
        steps += done
        rounds += 1
        for s in seqs:
            runner.release(s)
    return decoded / spent, spent * 1000 / steps


def _texts(max_length: int, count_tokens: Callable[[list[str]], list[int]]) -> list[str]:
    from server.cli_drill import _examples

    texts = _examples()["triage"] or ["Patient reports chest pain radiating to the left arm."]
    return [t for t, n in zip(texts, count_tokens(texts)) if n <= max_length] or texts[:1]


def sweep_embedding(spec: Any, threads: list[int], batches: list[int], seconds: float,
                    tick: Callable[[str], None]) -> dict[str, Any]:
    """Embeddings/s of ``OnnxEmbedder.embed`` (inputs already tokenised) over threads × batch
    sizes, on the triage example messages in turn (batches padded to their longest, as in the server)."""
    from models.onnx_runner import OnnxEmbedder

    max_length = spec.context_length or 512
    rows: list[dict[str, Any]] = []
    for t in threads:
        embedder = OnnxEmbedder(spec.path, spec.tokenizer_path, t, max_length)
        ids = embedder.tokenize(_texts(max_length, embedder.count_tokens))
        for b in batches:
            embedder.embed([ids[i % len(ids)] for i in range(b)])
            n = k = 0
            t0 = time.perf_counter()
            while k < 3 or time.perf_counter() - t0 < seconds:
                embedder.embed([ids[(k * b + i) % len(ids)] for i in range(b)])
                n += b
                k += 1
            rate = n / (time.perf_counter() - t0)
            rows.append({"threads": t, "batch": b, "per_s": rate})
            tick(f"{spec.id}: {t} threads, batch {b}: {rate:.0f} embeddings/s")
        del embedder
        gc.collect()
    return {"rows": rows}


def sweep_classifier(spec: Any, embedding: Any, head_path: Path, threads: int, batches: list[int], seconds: float,
                     tick: Callable[[str], None]) -> dict[str, Any]:
    """Classifications/s of the real ``Classifier.classify`` (chunking, embedding, head, language
    check, red-flag net) over batch sizes, with the server's cached head and an in-process
    embedder at the embedding model's served thread count."""
    from models.classifier import Classifier, Head, LanguageCheck
    from models.onnx_runner import OnnxEmbedder
    from models.redflags import RedFlagNet

    cs = spec.classifier
    max_length = embedding.context_length or 512
    embedder = OnnxEmbedder(embedding.path, embedding.tokenizer_path, threads, max_length)

    async def embed(texts: list[str], priority: int) -> tuple[Any, int]:
        ids = embedder.tokenize(texts)
        return embedder.embed(ids), sum(len(x) for x in ids)

    classifier = Classifier(cs, Head.load(head_path), RedFlagNet(cs.red_flags), LanguageCheck(cs.language), embed,
                            embedder.count_tokens, max_length, spec.sha256)
    texts = _texts(max_length, embedder.count_tokens)
    rows: list[dict[str, Any]] = []

    async def measure(b: int) -> float:
        await classifier.classify(texts[:b], 0)
        n = k = 0
        t0 = time.perf_counter()
        while k < 3 or time.perf_counter() - t0 < seconds:
            await classifier.classify([texts[(k * b + i) % len(texts)] for i in range(b)], 0)
            n += b
            k += 1
        return n / (time.perf_counter() - t0)

    for b in batches:
        rate = asyncio.run(measure(b))
        rows.append({"threads": threads, "batch": b, "per_s": rate})
        tick(f"{spec.id}: batch {b}: {rate:.0f} classifications/s")
    del embedder, classifier
    gc.collect()
    return {"rows": rows, "threads": threads, "how": "in process: Classifier.classify over OnnxEmbedder, cached head"}


# -- other processes -------------------------------------------------------------------------------

class CpuWatch:
    """How much CPU other processes (and the hypervisor: steal) took while the benchmark ran.
    On a 2-core box a second busy process is enough to make 2-thread decoding several times
    slower (each OpenMP barrier waits for a descheduled thread): a stage where others took a
    noticeable share of the cores measured the neighbours, not this box."""

    WARN_SHARE = 0.15

    def __init__(self, cores: int) -> None:
        import psutil

        self._psutil = psutil
        self.cores = max(1, cores)
        self.mark()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        me = self._psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in me.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except self._psutil.Error:
                pass
        return total

    def mark(self) -> None:
        self._t0, self._busy0, self._own0 = time.monotonic(), self._busy(), self._own()

    def share(self) -> float:
        """Share of the box's CPU (0-1) that others used since ``mark``."""
        wall = time.monotonic() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return max(0.0, other / (wall * self.cores)) if wall > 0 else 0.0


# -- tuning ----------------------------------------------------------------------------------------

def _entry(value: Any, default: Any, source: str, why: str) -> dict[str, Any]:
    return {"value": value, "default": default, "source": source, "why": why}


Confirm = Callable[[str, tuple[int, int], tuple[int, int]], tuple[float, float]]
"""``confirm(model_id, candidate_point, default_point)`` -> both figures re-measured, alternately."""


def _choose(key: str, default: int, figures: dict[int, float], what: str, unit: str, point: Callable[[int], tuple[int, int]],
            model_id: str, confirm: Confirm | None, eligible: Callable[[int, float], bool] = lambda v, f: True
            ) -> dict[str, Any]:
    """The best measured value of ``key`` if it beats the default's own figure by ``GAIN`` in the
    sweep and again when both are re-measured back to back (``confirm``); else the default."""
    base = figures[default]
    candidates = {v: f for v, f in figures.items() if v == default or eligible(v, f)}
    best = max(candidates, key=lambda v: candidates[v])
    if best == default:
        return _entry(default, default, "kept", f"the default {default} {what} measured best ({base:.0f} {unit})")
    gain = candidates[best] / base - 1
    if gain < GAIN:
        return _entry(default, default, "kept", f"the default {default} {what}: {base:.0f} {unit}; best other {best}: "
                                                f"{candidates[best]:.0f} ({gain:+.0%}), under +{GAIN:.0%}")
    sweep = f"{best} {what}: {candidates[best]:.0f} {unit}, default {default}: {base:.0f} ({gain:+.0%})"
    if confirm is not None:
        again_best, again_default = confirm(model_id, point(best), point(default))
        again = again_best / again_default - 1 if again_default else 0.0
        if again < GAIN:
            return _entry(default, default, "kept", f"{sweep} in the sweep, but {again:+.0%} when both were measured again "
                                                    f"back to back ({again_best:.0f} vs {again_default:.0f}): not confirmed")
        sweep += f"; measured again back to back: {again_best:.0f} vs {again_default:.0f} ({again:+.0%})"
    return _entry(best, default, "tuned", sweep)


def derive_tuned(defaults: dict[str, dict[str, Any]], sweeps: dict[str, Any], pinned: dict[str, dict[str, Any]],
                 kv_for_slots: Callable[[str, int], int], confirm_chat: Confirm | None = None,
                 confirm_embedding: Confirm | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model, per fragment key: the value, the default, and why (``tuned``, ``kept``,
    ``follows`` another value, or ``pinned`` by the user's config)."""
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    for model_id, sweep in sweeps.get("chat", {}).items():
        s = defaults[model_id]
        pin = pinned.get(model_id, {})
        fig = {(r["threads"], r["batch"]): r["gen_tok_s"] for r in sweep["rows"]}
        t0, b0 = s["threads"], s["slots"]
        out: dict[str, dict[str, Any]] = {}
        if "threads" in pin:
            out["threads"] = _entry(t0, t0, "pinned", "set by --config")
        else:
            out["threads"] = _choose("threads", t0, {t: v for (t, b), v in fig.items() if b == b0}, "threads",
                                     f"tok/s at {b0} sequences", lambda t: (t, b0), model_id, confirm_chat)
        threads = out["threads"]["value"]
        frozen = [k for k in ("slots", "kv_tokens", "max_waiting") if k in pin]
        if frozen:
            out["slots"] = _entry(b0, b0, "pinned", f"{', '.join(frozen)} set by --config")
        else:  # each sequence must still stream at MIN_STREAM_TOK_S
            out["slots"] = _choose("slots", b0, {b: v for (t, b), v in fig.items() if t == threads}, "sequences",
                                   f"tok/s with {threads} threads", lambda b: (threads, b), model_id, confirm_chat,
                                   lambda b, f: f / b >= MIN_STREAM_TOK_S)
        slots = out["slots"]["value"]
        if slots != b0:
            kv = kv_for_slots(model_id, slots)
            out["kv_tokens"] = _entry(kv, s["kv_tokens"], "follows", f"{kv // slots} tokens per slot x {slots} slots, as the "
                                      f"server derives it (default {s['kv_tokens']} for {b0} slots)")
            out["max_waiting"] = _entry(4 * slots, s["max_waiting"], "follows", f"slots: 4 waiting per slot, the server's rule (default {s['max_waiting']})")
        else:
            for key in ("kv_tokens", "max_waiting"):
                out[key] = _entry(s[key], s[key], "pinned" if key in pin else "kept",
                                  "set by --config" if key in pin else "the default for these slots")
        bt = s["batch_tokens"]
        out["batch_tokens"] = _entry(bt, bt, "pinned" if "batch_tokens" in pin else "kept",
                                     "set by --config" if "batch_tokens" in pin else
                                     "the default (the step token budget only shapes prefill chunks; not swept)")
        tuned[model_id] = {k: out[k] for k in FRAGMENT_KEYS["chat"]}
    for model_id, sweep in sweeps.get("embeddings", {}).items():
        s = defaults[model_id]
        pin = pinned.get(model_id, {})
        fig = {(r["threads"], r["batch"]): r["per_s"] for r in sweep["rows"]}
        t0, b0 = s["threads"], s["max_batch_requests"]
        out = {}
        if "threads" in pin:
            out["threads"] = _entry(t0, t0, "pinned", "set by --config")
        else:
            out["threads"] = _choose("threads", t0, {t: v for (t, b), v in fig.items() if b == b0}, "threads",
                                     f"embeddings/s at batch {b0}", lambda t: (t, b0), model_id, confirm_embedding)
        threads = out["threads"]["value"]
        if "max_batch_requests" in pin:
            out["max_batch_requests"] = _entry(b0, b0, "pinned", "set by --config")
        else:
            out["max_batch_requests"] = _choose("max_batch_requests", b0, {b: v for (t, b), v in fig.items() if t == threads},
                                                "inputs per batch", f"embeddings/s with {threads} threads", lambda b: (threads, b),
                                                model_id, confirm_embedding)
        mw = s["max_waiting"]
        out["max_waiting"] = _entry(mw, mw, "pinned" if "max_waiting" in pin else "kept",
                                    "set by --config" if "max_waiting" in pin else "the default queue bound (inputs)")
        tuned[model_id] = {k: out[k] for k in FRAGMENT_KEYS["embedding"]}
    return tuned


def revert_tuned(tuned: dict[str, dict[str, dict[str, Any]]], reason: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Every changed value back to its default, saying why (the validation did not hold)."""
    return {m: {k: (e if e["value"] == e["default"] else
                    _entry(e["default"], e["default"], "kept", f"{reason}; the sweep had proposed {e['value']} ({e['why']})"))
                for k, e in keys.items()} for m, keys in tuned.items()}


def fragment_values(tuned: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {m: {k: e["value"] for k, e in keys.items()} for m, keys in tuned.items()}


def fragment_conflicts(base_data: dict[str, Any], values: dict[str, dict[str, Any]]) -> list[str]:
    models = base_data.get("models") or {}
    out = []
    for model_id, keys in values.items():
        table = models.get(model_id) or {}
        for key, value in keys.items():
            if key in table and table[key] != value:
                out.append(f"[models.{model_id}] {key}: --config sets {table[key]!r}, the fragment {value!r}")
    return out


def capacity_lines(capacity: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, c in capacity.items():
        what = "to the first sentence" if c.get("metric") == "first sentence" else \
            "to the first token" if c.get("metric") == "first token" else "end to end"
        if c["rate_per_min"] > 0:
            least = "at least " if c.get("lower_bound") else ""  # no rate tried failed: the search ran out of steps
            lines.append(f"this box sustains {least}{c['rate_per_min']} {name} requests a minute at p95 ≤ {c['target_p95_s']:g} s "
                         f"({what}; measured p95 {_g(c['p95_s'], 3)} s)")
        else:
            lines.append(f"this box did not sustain {name} at any rate tried with p95 ≤ {c['target_p95_s']:g} s ({what})")
    return lines


def render_fragment(tuned: dict[str, dict[str, dict[str, Any]]], header: list[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    for model_id, keys in tuned.items():
        lines += ["", f"[models.{toml_key(model_id)}]"]
        width = max(len(f"{k} = {toml_value(e['value'])}") for k, e in keys.items())
        for key, e in keys.items():
            assignment = f"{key} = {toml_value(e['value'])}"
            lines.append(f"{assignment:<{width}}  # {e['source']}: {e['why']}")
    return "\n".join(lines) + "\n"


# -- plots and report ------------------------------------------------------------------------------

def make_plots(results: dict[str, Any], out: Path, cpu: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    sweeps = results["sweeps"]
    suffix = f"\n{cpu}, {results['usable_cores']} usable cores"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        tmp = out / f".{name}.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out / name)
        files.append(name)

    panels = [(f"{m} generation", "tok/s", s["rows"], "gen_tok_s", "sequences") for m, s in sweeps["chat"].items()]
    panels += [(f"{m} embeddings", "embeddings/s", s["rows"], "per_s", "batch") for m, s in sweeps["embeddings"].items()]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (title, unit, rows, key, series) in zip(axes[0], panels):
            for b in sorted({r["batch"] for r in rows}):
                pts = sorted((r["threads"], r[key]) for r in rows if r["batch"] == b)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{series} {b}")
            ax.set_xlabel("threads")
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=10)
            ax.set_xticks(sorted({r["threads"] for r in rows}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Throughput vs threads" + suffix, fontsize=10)
        save(fig, "throughput_vs_threads.png")

    panels = [(f"{m} generation", "tok/s", s["rows"], "gen_tok_s", "threads") for m, s in sweeps["chat"].items()]
    panels += [(f"{m} embeddings", "embeddings/s", s["rows"], "per_s", "threads") for m, s in sweeps["embeddings"].items()]
    panels += [(f"{m} classifications", "classifications/s", s["rows"], "per_s", "threads") for m, s in sweeps["triage"].items()]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (title, unit, rows, key, series) in zip(axes[0], panels):
            for t in sorted({r["threads"] for r in rows}):
                pts = sorted((r["batch"], r[key]) for r in rows if r["threads"] == t)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{t} threads")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch"] for r in rows}))
            ax.set_xticklabels([str(b) for b in sorted({r["batch"] for r in rows})])
            ax.set_xlabel("batch size (sequences / inputs decoded together)")
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Throughput vs batch size" + suffix, fontsize=10)
        save(fig, "throughput_vs_batch.png")

    serving = results["serving"]["rows"]
    if serving:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
        cs = [r["c"] for r in serving]
        a1.plot(cs, [r["tok_s"] for r in serving], marker="o")
        a1.set_ylabel("aggregate completion tok/s")
        a1.set_title(f"Streaming chat ({results['serving']['model']})", fontsize=10)
        for key, label in (("ttft50", "TTFT p50"), ("ttft95", "TTFT p95"), ("itl50", "ITL p50"), ("itl95", "ITL p95")):
            a2.plot(cs, [(r[key] if r[key] is not None else float("nan")) for r in serving], marker="o", label=label)
        a2.set_yscale("log")
        a2.set_ylabel("seconds")
        a2.set_title("Latency percentiles", fontsize=10)
        a2.legend(fontsize=8)
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs)
            ax.set_xticklabels([str(c) for c in cs])
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
        fig.suptitle("Serving vs concurrency" + suffix, fontsize=10)
        save(fig, "serving_vs_concurrency.png")

    searches = results["capacity_search"]
    if searches:
        fig, axes = plt.subplots(1, len(searches), figsize=(6 * len(searches), 4.2), squeeze=False)
        for ax, (name, s) in zip(axes[0], searches.items()):
            steps = sorted(s["steps"], key=lambda x: x["rate_per_min"])
            rates = [x["rate_per_min"] for x in steps]
            for key, label in (("p50_s", "p50"), ("p95_s", "p95"), ("p99_s", "p99")):
                ax.plot(rates, [x[key] if x[key] is not None else float("nan") for x in steps], marker="o", label=label)
            ax.axhline(s["target_p95_s"], color="red", linestyle="--", label=f"target p95 {s['target_p95_s']:g} s")
            for x in steps:
                if not x["passed"]:
                    ax.axvline(x["rate_per_min"], color="grey", alpha=0.25)
            ax.set_xlabel("offered rate (requests/minute, Poisson)")
            ax.set_ylabel(f"latency, {s['metric']} (s)")
            ax.set_title(f"{name}: sustains {s['rate_per_min']}/min", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Latency vs request rate (capacity search; grey: failed steps)" + suffix, fontsize=10)
        save(fig, "capacity_latency_vs_rate.png")
    return files


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(r: dict[str, Any]) -> str:
    cpu = r["cpu_model"]
    where = f"{cpu}, {r['usable_cores']} usable cores"
    hw = (r.get("admin_hardware") or {}).get("hardware") or {}
    engines = (r.get("admin_hardware") or {}).get("engines") or {}
    L = [f"# Understudy hardware benchmark: {r['host']} ({cpu})", "",
         f"{r['started_at']}, profile `{r['profile']}`, {_fmt_duration(r['timings']['total_s'])} in all.", "",
         "Command:", "", "```sh", r["command"], "```", "", "## Hardware", ""]
    cpu_hw = hw.get("cpu") or {}
    mem = hw.get("memory") or {}
    gpu = hw.get("gpu") or {}
    L += _table(["", ""], [
        ["CPU (lscpu)", cpu],
        ["Cores", f"{cpu_hw.get('physical_cores')} physical, {cpu_hw.get('logical_cores')} logical, {hw.get('usable_cores')} usable"],
        ["CPU features", " ".join(cpu_hw.get("flags") or []) or "-"],
        ["RAM", f"{(mem.get('total_bytes') or 0) // 2**20} MiB total, {(hw.get('usable_memory_bytes') or 0) // 2**20} MiB usable"],
        ["GPUs", ", ".join(g.get("name", "?") for g in gpu.get("gpus") or []) or f"none ({gpu.get('reason')})"],
        ["llama.cpp", json.dumps((engines or {}).get("llama_cpp"))[:300] if engines else "-"],
        ["onnxruntime", json.dumps((engines or {}).get("onnxruntime"))[:300] if engines else "-"],
    ])
    L += ["", "## Plan and served settings (the defaults on this box)", ""]
    plan = (r.get("admin_hardware") or {}).get("plan")
    if plan is not None:
        L += ["Plan (`GET /admin/hardware` → `plan`):", "", "```json", json.dumps(plan, indent=2)[:4000], "```", ""]
    for model_id, settings in r["defaults"].items():
        L.append(f"- `{model_id}`: " + ", ".join(f"{k}={v}" for k, v in settings.items()
                                                 if not isinstance(v, (dict, list)) and k not in ("cache", "head_sha256", "examples_sha256", "red_flags_sha256")))
    L += ["", "## Warnings", ""]
    warnings = (r.get("admin_hardware") or {}).get("warnings") or []
    L += [f"- {w}" for w in warnings] or ["None from the server: the engines use what this machine has."]
    L += [f"- **benchmark:** {w}" for w in r.get("bench_warnings", [])]

    L += ["", f"## Engine sweeps ({where})", "",
          "In process, no HTTP, one runner at a time, every decode from one thread.", ""]
    for model_id, s in r["sweeps"]["chat"].items():
        threads = sorted({x["threads"] for x in s["rows"]})
        batches = sorted({x["batch"] for x in s["rows"]})
        fig = {(x["threads"], x["batch"]): x for x in s["rows"]}
        L += [f"### {model_id}: generation tok/s ({s['gen_tokens']} tokens per sequence, greedy) on {cpu}", ""]
        L += _table(["threads"] + [f"{b} seq" for b in batches],
                    [[str(t)] + [f"{fig[(t, b)]['gen_tok_s']:.1f} ({fig[(t, b)]['step_ms']:.1f} ms/step)" if (t, b) in fig else "-"
                                 for b in batches] for t in threads])
        L += ["", f"Prompt processing ({s['prompt_tokens']} tokens, chunks of {s['batch_tokens']}): "
              + ", ".join(f"{x['threads']} threads {x['pp_tok_s']:.0f} tok/s" for x in s["rows"] if x.get("pp_tok_s")), ""]
    for model_id, s in r["sweeps"]["embeddings"].items():
        threads = sorted({x["threads"] for x in s["rows"]})
        batches = sorted({x["batch"] for x in s["rows"]})
        fig = {(x["threads"], x["batch"]): x["per_s"] for x in s["rows"]}
        L += [f"### {model_id}: embeddings/s (triage messages) on {cpu}", ""]
        L += _table(["threads"] + [f"batch {b}" for b in batches],
                    [[str(t)] + [_g(fig.get((t, b))) for b in batches] for t in threads])
        L.append("")
    for model_id, s in r["sweeps"]["triage"].items():
        L += [f"### {model_id}: classifications/s on {cpu} ({s['how']}, {s['threads']} threads)", ""]
        L += _table(["batch", "classifications/s"], [[str(x["batch"]), _g(x["per_s"])] for x in s["rows"]])
        L.append("")
    for note in r["sweeps"].get("notes", []):
        L.append(f"- {note}")

    sv = r["serving"]
    L += ["", f"## Serving sweep ({where})", "",
          f"Streaming greedy chat, `{sv['model']}`, {sv['max_tokens']} max tokens, closed-loop clients, {sv['seconds']:g} s per level "
          "(`bench_serving.run_level`).", ""]
    L += _table(["clients", "tok/s", "done", "failed", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "E2E p50", "E2E p95"],
                [[str(x["c"]), _g(x["tok_s"]), str(x["done"]), str(x["failed"]), f"{_g(x['ttft50'], 3)} s", f"{_g(x['ttft95'], 3)} s",
                  f"{_g((x['itl50'] or 0) * 1000)} ms", f"{_g((x['itl95'] or 0) * 1000)} ms", f"{_g(x['e2e50'], 2)} s",
                  f"{_g(x['e2e95'], 2)} s"] for x in sv["rows"]])

    L += ["", f"## Capacity ({where})", ""]
    L += [f"- **{line}**" for line in capacity_lines(r["capacity"])] or ["No covered workload to measure."]
    for s in r.get("skipped_workloads", []):
        L.append(f"- not measured: {s}")
    L += ["", "Open-loop Poisson arrivals (fixed seed), latency from each request's scheduled time; a step passes when "
          f"the p95 is within the target and at least {SUCCESS_SHARE:.0%} of the requests are answered (429, 503, errors and "
          "time-outs are misses). The load generator runs on this box too. Measured with the served config "
          "(defaults). `understudy drill --synthetic last` drills at half the sum of these rates.", ""]
    for name, s in r["capacity_search"].items():
        L += [f"### {name}: `{s['endpoint']}`, {s['metric']}, target p95 {s['target_p95_s']:g} s "
              f"(closed loop, {s['closed_loop_clients']} clients: {s['closed_loop_per_s'] * 60:.0f}/min)", ""]
        L += _table(["step", "rate/min", "sent", "answered", "p50", "p95", "p99", "misses", "verdict"],
                    [[str(i + 1), f"{x['rate_per_min']:.0f}", str(x["sent"]), f"{x['ok_share']:.1%}", f"{_g(x['p50_s'], 3)} s",
                      f"{_g(x['p95_s'], 3)} s", f"{_g(x['p99_s'], 3)} s", json.dumps(x["misses"]) if x["misses"] else "-",
                      "pass" if x["passed"] else "FAIL"] for i, x in enumerate(s["steps"])])
        L.append("")
    if r.get("capacity_file"):
        L.append(f"Copied to `{r['capacity_file']}`.")
    elif r.get("capacity_file_error"):
        L.append(f"Not copied to the state folder: {r['capacity_file_error']}")

    L += ["", "## Tuned settings", "",
          f"A value differs from the served default only where its sweep measured at least {GAIN:.0%} more than the default's "
          "own figure in this run.", ""]
    rows = [[f"`{m}`", k, str(e["default"]), str(e["value"]), e["source"], e["why"]] for m, keys in r["tuned"].items() for k, e in keys.items()]
    L += _table(["model", "key", "default", "written", "", "why"], rows) if rows else ["No engine to tune."]
    if (r.get("validation") or {}).get("reverted"):
        L += ["", "The validation found the proposed values slower than the defaults: the written config keeps the defaults "
                  "(the proposal is under `tuned_proposed` in results.json)."]
    if r.get("config_fragment"):
        L += ["", f"Written to `{r['config_fragment']}`: `understudy serve --config {r['config_fragment']}`."]

    v = r.get("validation")
    L += ["", f"## Validation: tuned vs defaults ({where})", ""]
    if not v:
        L.append("Skipped.")
    else:
        L += [f"Two servers, the defaults and the tuned settings, measured alternately in {len(v['rounds'])} round(s) "
              f"({v['seconds']:g} s per measurement): aggregate tok/s at {VALIDATION_CHAT_CLIENTS} streaming clients and "
              f"/v1/triage classifications/s at {VALIDATION_TRIAGE_CLIENTS} clients (the triage example messages, as in "
              "the sweep and the capacity search). Ratios are tuned / defaults, median of the rounds.", ""]
        L += _table(["round", "order", "defaults tok/s", "tuned tok/s", "ratio", "defaults triage/s", "tuned triage/s", "ratio"],
                    [[str(i + 1), x["order"], _g(x["defaults"].get("chat_tok_s")), _g(x["tuned"].get("chat_tok_s")), _g(x.get("chat_ratio"), 2),
                      _g(x["defaults"].get("triage_per_s")), _g(x["tuned"].get("triage_per_s")), _g(x.get("triage_ratio"), 2)]
                     for i, x in enumerate(v["rounds"])])
        L += ["", f"- chat tok/s at {VALIDATION_CHAT_CLIENTS} clients, tuned / defaults: **{_g(v.get('chat_ratio'), 2)}×**",
              f"- triage classifications/s at {VALIDATION_TRIAGE_CLIENTS} clients, tuned / defaults: **{_g(v.get('triage_ratio'), 2)}×**",
              f"- the tuned server applied the written values: {'yes' if v.get('settings_applied') else 'NO: ' + json.dumps(v.get('settings_mismatch'))}",
              f"- {v['verdict']}"]
    if r.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]]
    other = r.get("other_cpu") or {}
    L += ["", "## Timings", ""] + [f"- {k}: {_fmt_duration(s)}" + (f" (other processes used {other[k]:.0%} of the CPU meanwhile)"
                                                                    if k in other else "") for k, s in r["timings"].items()]
    return "\n".join(L) + "\n"


# -- the run ---------------------------------------------------------------------------------------

def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


def run(args: argparse.Namespace, command: str) -> int:
    started = time.monotonic()
    try:
        setup = preflight(args)
    except UsageError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    import signal

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the servers are stopped on the way out (``_run``'s finally)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return _run(setup, args, command, started)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; nothing complete was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(setup: Setup, args: argparse.Namespace, command: str, started: float) -> int:
    import httpx

    from bench_serving import embed_level, launch_understudy, run_level

    _track_summary_sentences()
    for name in _KEY_ENV:  # the benchmark's servers are private loopback servers without keys
        os.environ.pop(name, None)
    out = setup.out
    prof = setup.profile
    tmp = Path(tempfile.mkdtemp(prefix="understudy-bench-"))
    cpu = cpu_model_name()
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "complete": False, "command": command, "host": socket.gethostname(), "cpu_model": cpu,
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "profile": "quick" if args.quick else "full", "config": str(setup.base_path) if setup.base_path else None,
        "parameters": {k: v for k, v in prof.items()}, "logs": str(tmp),
        "sweeps": {"chat": {}, "embeddings": {}, "triage": {}, "notes": []},
        "serving": {"rows": []}, "capacity": {}, "capacity_search": {}, "tuned": {}, "validation": None,
    }
    partial = out / "results.partial.json"

    def checkpoint(stage: str, t0: float) -> None:
        timings[stage] = time.monotonic() - t0
        results["timings"] = dict(timings)
        w = results.get("_watch")
        if w is not None:
            share = w.share()
            results["other_cpu"][stage] = share
            if share > CpuWatch.WARN_SHARE:
                message = (f"other processes used {share:.0%} of this box's CPU during the {stage} stage: its figures "
                           "measured the neighbours too; run the benchmark on an otherwise idle box")
                results.setdefault("bench_warnings", []).append(message)
                print(f"  WARNING: {message}", flush=True)
            w.mark()
        atomic_write(partial, json.dumps(_clean({k: v for k, v in results.items() if not k.startswith("_")}), indent=2))

    servers: list[Any] = []

    def launch(text: str, name: str) -> Any:
        try:
            server = launch_understudy(tmp, text, state_dir=tmp / f"state-{name}", name=name)
        except SystemExit as exc:
            raise BenchError(f"the {name} server did not start: {exc}") from None
        servers.append(server)
        return server

    def stop(server: Any) -> None:
        server.stop()
        if server in servers:
            servers.remove(server)

    print(f"Understudy bench on {results['host']}: {cpu}; config {setup.base_path or 'embedded default'}; "
          f"output {out}; server logs in {tmp}", flush=True)
    bar = None
    try:
        # 1. The served defaults ------------------------------------------------------------------
        t0 = time.monotonic()
        base_text = server_config_text(setup.base_data, setup.base_dir, {})
        server = launch(base_text, "defaults")
        admin = httpx.get(server.url + "/admin/hardware", timeout=30).json()
        ready_body = httpx.get(server.url + "/ready", timeout=30).json()
        results["admin_hardware"] = admin
        results["ready"] = ready_body
        hw = admin.get("hardware") or {}
        usable = int(hw.get("usable_cores") or os.cpu_count() or 1)
        results["usable_cores"] = usable
        results["_watch"] = CpuWatch(usable)
        results["other_cpu"] = {}
        ready = {m for m, info in admin["models"].items() if info.get("state") == "ready"}
        defaults = {m: info.get("settings") or {} for m, info in admin["models"].items() if m in ready}
        results["defaults"] = defaults
        specs = {s.id: s for s in setup.config.models}
        chat_ids = [m for m in ready if _model_kind(specs[m]) == "chat"]
        embed_ids = [m for m in ready if _model_kind(specs[m]) == "embedding"]
        from models.catalog import ModelKind

        clf_ids = [m for m in ready if specs[m].kind is ModelKind.CLASSIFIER]
        workloads, skipped = covered_workloads(setup.config, ready)
        results["workloads"] = [{"name": w.name, "kind": w.kind, "local_model": w.local_model, "endpoint": w.path,
                                 "metric": w.metric, "target_p95_s": w.target_p95_s} for w in workloads]
        results["skipped_workloads"] = skipped
        triage_wl = next((w for w in workloads if w.kind == "triage"), None)
        validation_clf = triage_wl.local_model if triage_wl else (clf_ids[0] if clf_ids else None)
        chat_model = next((m for m in chat_ids), None)

        if prof["threads"]:
            threads = sorted(set(prof["threads"]))
        else:
            threads = sorted({1, usable}) if args.quick else list(range(1, usable + 1))
        chat_threads = {m: sorted(set(threads) | {defaults[m]["threads"]}) for m in chat_ids}
        chat_batches = {m: sorted(set(prof["batches"]) | {defaults[m]["slots"]}) for m in chat_ids}
        embed_threads = {m: sorted(set(threads) | {defaults[m]["threads"]}) for m in embed_ids}
        embed_batches = {m: sorted(set(prof["embed_batches"]) | {defaults[m]["max_batch_requests"]}) for m in embed_ids}
        clf_batches = sorted(set(prof["embed_batches"]))
        total = (len(prof["levels"]) * (1 if chat_model else 0)
                 + sum(1 + prof["capacity_steps"] for _ in workloads)
                 + sum(len(chat_threads[m]) * len(chat_batches[m]) for m in chat_ids)
                 + sum(len(embed_threads[m]) * len(embed_batches[m]) for m in embed_ids)
                 + len(clf_ids) * len(clf_batches)
                 + (0 if args.skip_validation else 1 + prof["validation_rounds"] * 2) + 2)
        bar = _progress(total)
        bar.set_description("defaults")
        bar.update(1)

        def tick(message: str | None = None) -> None:
            if message:
                bar.write(f"  {message}")
            bar.update(1)

        checkpoint("served defaults", t0)

        # 2. Serving sweep ------------------------------------------------------------------------
        t0 = time.monotonic()
        if chat_model:
            bar.set_description("serving sweep")
            server.model = chat_model
            rows = []
            for c in prof["levels"]:
                row = asyncio.run(run_level(server, c, prof["seconds"], args.max_tokens)).summary(args.max_tokens)
                rows.append(row)
                tick(f"serving, {c} clients: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft50']:.3f} s, "
                     f"ITL p50 {row['itl50'] * 1000:.1f} ms" if row["done"] else f"serving, {c} clients: nothing completed")
            results["serving"] = {"model": chat_model, "max_tokens": args.max_tokens, "seconds": prof["seconds"], "rows": rows}
        else:
            results["serving"] = {"model": None, "max_tokens": args.max_tokens, "seconds": prof["seconds"], "rows": []}
        checkpoint("serving sweep", t0)

        # 3. Capacity per covered workload --------------------------------------------------------
        t0 = time.monotonic()
        bar.set_description("capacity")
        for i, wl in enumerate(workloads):
            def on_step(step: dict[str, Any], wl: Workload = wl) -> None:
                if "closed_loop" in step:
                    tick(f"{wl.name}: closed loop {step['closed_loop'] * 60:.0f}/min with {wl.closed_clients} clients")
                else:
                    tick(f"{wl.name}: {step['rate_per_min']:.0f}/min: p95 {_g(step['p95_s'], 3)} s, "
                         f"{step['ok_share']:.1%} answered: {'pass' if step['passed'] else 'FAIL'}")

            search = capacity_search(server.url, wl, prof["capacity_steps"], prof["seconds"], 12 + i, on_step)
            results["capacity_search"][wl.name] = search
            results["capacity"][wl.name] = {"rate_per_min": search["rate_per_min"], "target_p95_s": wl.target_p95_s,
                                            "p95_s": search["p95_s"], "metric": wl.metric, "endpoint": wl.path}
        stop(server)
        checkpoint("capacity", t0)

        # 4. Engine sweeps ------------------------------------------------------------------------
        t0 = time.monotonic()
        bar.set_description("engine sweeps")
        for m in chat_ids:
            results["sweeps"]["chat"][m] = sweep_chat(specs[m], int(defaults[m].get("gpu_layers") or 0), chat_threads[m],
                                                      chat_batches[m], prof["engine_seconds"], int(defaults[m]["batch_tokens"]), tick)
            gc.collect()
        for m in embed_ids:
            results["sweeps"]["embeddings"][m] = sweep_embedding(specs[m], embed_threads[m], embed_batches[m],
                                                                 prof["engine_seconds"], tick)
        for m in clf_ids:
            settings = defaults[m]
            emb = settings.get("embedding_model")
            head = Path(settings.get("cache") or "")
            if emb in embed_ids and head.is_file():
                results["sweeps"]["triage"][m] = sweep_classifier(specs[m], specs[emb], head, int(defaults[emb]["threads"]),
                                                                  clf_batches, prof["engine_seconds"], tick)
            else:
                results["sweeps"]["notes"].append(f"{m}: not swept in process (embedding model or cached head missing)")
                bar.update(len(clf_batches))
        checkpoint("engine sweeps", t0)

        # 5. Tuned settings and validation --------------------------------------------------------
        t0 = time.monotonic()
        from hardware.detect import detect

        hw_info = detect()

        def kv_for_slots(model_id: str, slots: int) -> int:
            pin = setup.pinned.get(model_id, {})
            return int(hardware_defaults(specs, model_id, hw_info, {**pin, "slots": slots})["kv_tokens"])

        def quiet(message: str) -> None:
            pass

        def confirm(measure: Callable[[str, tuple[int, int]], float]) -> Confirm:
            def run_again(model_id: str, a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float]:
                bar.total += 4
                figures: dict[tuple[int, int], list[float]] = {a: [], b: []}
                for order in ((a, b), (b, a)):  # alternately, so a drift hits both
                    for point in order:
                        figures[point].append(measure(model_id, point))
                        tick()
                bar.write(f"  {model_id}: {a} vs {b} measured again: {statistics.median(figures[a]):.0f} vs "
                          f"{statistics.median(figures[b]):.0f}")
                return statistics.median(figures[a]), statistics.median(figures[b])
            return run_again

        def measure_chat(model_id: str, point: tuple[int, int]) -> float:
            rows = sweep_chat(specs[model_id], int(defaults[model_id].get("gpu_layers") or 0), [point[0]], [point[1]],
                              prof["engine_seconds"], int(defaults[model_id]["batch_tokens"]), quiet, measure_prompt=False)["rows"]
            return float(rows[0]["gen_tok_s"])

        def measure_embedding(model_id: str, point: tuple[int, int]) -> float:
            return float(sweep_embedding(specs[model_id], [point[0]], [point[1]], prof["engine_seconds"], quiet)["rows"][0]["per_s"])

        bar.set_description("tuning")
        tuned = derive_tuned(defaults, {"chat": results["sweeps"]["chat"], "embeddings": results["sweeps"]["embeddings"]},
                             setup.pinned, kv_for_slots, confirm(measure_chat), confirm(measure_embedding))
        results["tuned"] = tuned
        values = fragment_values(tuned)
        if not args.skip_validation:
            bar.set_description("validation")
            tuned_text = server_config_text(setup.base_data, setup.base_dir, values)
            servers_v = {"defaults": launch(base_text, "defaults-v"), "tuned": launch(tuned_text, "tuned")}
            applied = httpx.get(servers_v["tuned"].url + "/admin/hardware", timeout=30).json()["models"]
            mismatch = {f"{m}.{k}": {"written": v, "served": (applied.get(m, {}).get("settings") or {}).get(k)}
                        for m, keys in values.items() for k, v in keys.items()
                        if (applied.get(m, {}).get("settings") or {}).get(k) != v}
            tick("validation servers ready")
            rounds = []
            for rnd in range(prof["validation_rounds"]):
                order = ["defaults", "tuned"] if rnd % 2 == 0 else ["tuned", "defaults"]
                row: dict[str, Any] = {"order": " → ".join(order)}
                for name in order:
                    s = servers_v[name]
                    figures: dict[str, float] = {}
                    if chat_model:
                        s.model = chat_model
                        figures["chat_tok_s"] = asyncio.run(run_level(s, VALIDATION_CHAT_CLIENTS, prof["validation_seconds"],
                                                                      args.max_tokens)).tok_s
                    if triage_wl is not None:  # the triage example messages, as in the sweep and the capacity search
                        figures["triage_per_s"] = asyncio.run(closed_loop(s.url, triage_wl, VALIDATION_TRIAGE_CLIENTS,
                                                                          prof["validation_seconds"], 7 + rnd))
                    elif validation_clf:  # no triage workload: bench_serving's short texts, to the classifier itself
                        figures["triage_per_s"] = asyncio.run(embed_level(s, VALIDATION_TRIAGE_CLIENTS, prof["validation_seconds"],
                                                                          "/v1/triage", validation_clf))[0]
                    row[name] = figures
                    tick()
                for key, ratio in (("chat_tok_s", "chat_ratio"), ("triage_per_s", "triage_ratio")):
                    d, t = row["defaults"].get(key), row["tuned"].get(key)
                    row[ratio] = t / d if d and t is not None else None
                rounds.append(row)
                bar.write(f"  validation round {rnd + 1}: chat x{_g(row.get('chat_ratio'), 2)}, triage x{_g(row.get('triage_ratio'), 2)}")
            for name in list(servers_v):
                stop(servers_v[name])
            v: dict[str, Any] = {"rounds": rounds, "seconds": prof["validation_seconds"], "settings_applied": not mismatch,
                                 "settings_mismatch": mismatch}
            for ratio in ("chat_ratio", "triage_ratio"):
                got = [x[ratio] for x in rounds if x.get(ratio) is not None]
                v[ratio] = statistics.median(got) if got else None
            worst = min((x for x in (v["chat_ratio"], v["triage_ratio"]) if x is not None), default=None)
            identical = all(e["value"] == e["default"] for keys in tuned.values() for e in keys.values())
            if mismatch:
                raise BenchError(f"the tuned server did not apply the written values: {mismatch}")
            if worst is None:
                v["verdict"] = "nothing to compare"
            elif worst >= 1 - GAIN:
                v["verdict"] = ("the tuned settings serve at least as fast as the defaults (within this machine's ±5 % noise)"
                                + (" — they are the defaults: the ratios show the noise" if identical else ""))
            elif identical:
                v["verdict"] = (f"the tuned settings are the defaults, yet one server measured {worst:.2f}× the other: "
                                "this box was too noisy for these figures")
            else:
                # The written config must serve at least as fast as the defaults: it keeps them.
                v["verdict"] = (f"the tuned settings served SLOWER than the defaults (worst ratio {worst:.2f}×): "
                                "the written config keeps the defaults")
                v["reverted"] = True
                results["tuned_proposed"] = tuned
                tuned = revert_tuned(tuned, f"validation: served {worst:.2f}x the defaults' figure, reverted")
                results["tuned"] = tuned
                values = fragment_values(tuned)
            results["validation"] = v
        checkpoint("tuning and validation", t0)

        # 6. Outputs ------------------------------------------------------------------------------
        t0 = time.monotonic()
        bar.set_description("writing")
        state_dir = Path(setup.config.server.state_dir)
        capacity_file = state_dir / "capacity.json"
        if results["capacity"]:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                stamped = {name: {**c, "measured_at": results["started_at"], "host": results["host"], "cpu": cpu,
                                  "results": str((out / "results.json").absolute())} for name, c in results["capacity"].items()}
                atomic_write(capacity_file, json.dumps(_clean(stamped), indent=2) + "\n")
                results["capacity_file"] = str(capacity_file)
            except OSError as exc:
                results["capacity_file_error"] = f"{capacity_file}: {exc.strerror or exc}"
                bar.write(f"  WARNING: could not write {capacity_file}: {exc.strerror or exc}")
        if setup.write_config is not None:
            conflicts = fragment_conflicts(setup.base_data, values)
            if conflicts:
                raise BenchError(f"not writing {setup.write_config}: it would conflict with --config: {conflicts[0]}")
            results["config_fragment"] = str(setup.write_config)
        results["plots"] = make_plots(results, out, cpu)
        timings["outputs"] = time.monotonic() - t0
        timings["total_s"] = time.monotonic() - started
        results["timings"] = timings
        results["finished_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        if setup.write_config is not None:
            v = results.get("validation") or {}
            header = [
                f"Understudy engine settings tuned on {results['host']} ({cpu}, {usable} usable cores), {results['started_at']}.",
                f"Written by: {command}",
                f"Full results: {(out / 'results.json').absolute()}",
                "",
                "Capacity of this box with the served config (open-loop Poisson arrivals, p95 within each workload's target):",
                *[f"  {line}" for line in capacity_lines(results["capacity"])],
                "",
                f"Rule: a value differs from the server's default only where the sweep measured at least {GAIN:.0%} more than",
                "the default's own figure in the same run; otherwise the default is written, marked \"kept\".",
            ]
            if v:
                header += ["", f"Validation (tuned / defaults, median of {len(v['rounds'])} interleaved rounds): "
                               f"chat tok/s at {VALIDATION_CHAT_CLIENTS} clients {_g(v.get('chat_ratio'), 2)}x, "
                               f"triage/s at {VALIDATION_TRIAGE_CLIENTS} clients {_g(v.get('triage_ratio'), 2)}x: {v['verdict']}."]
            header += ["", f"Use: understudy serve --config {setup.write_config}"
                           + (f"   (with your config: --config {setup.base_path} --config {setup.write_config})" if setup.base_path else "")]
            text = render_fragment(tuned, header)
            import tomllib

            assert fragment_values(tuned) == {m: dict(t) for m, t in tomllib.loads(text)["models"].items()}
            try:
                setup.write_config.absolute().parent.mkdir(parents=True, exist_ok=True)
                atomic_write(setup.write_config, text, overwrite=args.force)
            except FileExistsError:
                raise BenchError(f"{setup.write_config} appeared while the benchmark ran; not overwritten (--force)") from None
        atomic_write(out / "report.md", render_report(results))
        results["complete"] = True
        atomic_write(out / "results.json", json.dumps(_clean({k: v for k, v in results.items() if not k.startswith("_")}),
                                                      indent=2) + "\n")
        try:
            partial.unlink()
        except FileNotFoundError:
            pass
        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for s in list(servers):
            s.stop()

    print(f"\nCPU: {cpu} ({usable} usable cores)")
    for m, s in results["sweeps"]["chat"].items():
        best = max(s["rows"], key=lambda x: x["gen_tok_s"])
        print(f"{m}: up to {best['gen_tok_s']:.0f} tok/s generation ({best['threads']} threads, {best['batch']} sequences)")
    for row in results["serving"]["rows"]:
        print(f"serving, {row['c']} clients: {row['tok_s']:.1f} tok/s, TTFT p50 {_g(row['ttft50'], 3)} s")
    for line in capacity_lines(results["capacity"]):
        print(line)
    v = results.get("validation")
    if v:
        print(f"validation, tuned / defaults: chat x{_g(v.get('chat_ratio'), 2)}, triage x{_g(v.get('triage_ratio'), 2)}: {v['verdict']}")
    print(f"results: {out / 'results.json'}, report: {out / 'report.md'}"
          + (f", config: {setup.write_config}" if setup.write_config else "")
          + (f", capacity: {results['capacity_file']}" if results.get("capacity_file") else ""))
    print(f"Total time: {_fmt_duration(timings['total_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
