"""Configuration: one TOML file, parsed once at start-up into frozen dataclasses.

Sources, strongest first: ``--host``/``--port`` flags, the file given by ``--config`` or the
``UNDERSTUDY_CONFIG`` environment variable, built-in defaults. No file at all means the embedded
default catalog, fully local. Any problem raises ``ConfigError`` naming the key
(``models.triage.sha256: required``); the CLI prints it and exits with status 2.

Unknown keys are errors too: a typo in a hospital's config must not be silently ignored.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.catalog import MINILM_ID, SMOLLM2_ID, TRIAGE_ID, EngineOptions, ModelFormat, ModelKind, ModelSpec, default_catalog
from models.priority import WORKLOAD_PRIORITIES
from server.breaker import BreakerConfig


CATALOG_FILE = "models.toml"
"""The pulled models' catalog, in the state directory unless ``[server] models_file`` names another."""


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    embedded_models: bool = True
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    log_level: str = "info"
    state_dir: Path = Path(".understudy")
    cache_dir: Path | None = None
    """Trained classifier heads (keyed by the hashes of what produced them, so safe to share
    between servers); default ``<state_dir>/cache``."""
    max_drill_s: float = 3600.0
    """The longest outage drill ``POST /admin/drill`` accepts."""
    admin_key: str | None = field(default=None, repr=False)
    metrics_key: str | None = field(default=None, repr=False)
    key_file: Path | None = None
    allowed_hosts: tuple[str, ...] | None = None
    """None: loopback names when bound to loopback, else any (``server.edge``)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: str = "text"
    drain_grace_s: float = 5.0
    """After SIGTERM, /ready is 503 at once but new requests are still served this long."""
    drain_timeout_s: float = 30.0
    """Then running requests get this long to finish before they are ended with an error event."""
    journal_retention_days: float = 90.0
    models_file: Path | None = None
    """The catalog of pulled models (``understudy models pull``); None: ``<state_dir>/models.toml``."""

    @property
    def classifier_cache(self) -> Path:
        return (self.cache_dir or self.state_dir / "cache") / "classifiers"

    @property
    def catalog_file(self) -> Path:
        """Where ``understudy models pull`` writes its ``[models.<id>]`` tables and ``serve`` reads them."""
        return self.models_file or self.state_dir / CATALOG_FILE


@dataclass(frozen=True)
class SlowPolicy:
    """When an upstream is judged slow (``server.failover.planner.slow_verdict``): its last
    ``min_samples`` first-token observations (all younger than ``window_s``) have a median above
    ``multiple`` × its baseline (the median of the last hour while it was normal) and above
    ``floor_s``; with no baseline yet, above ``cold_s``. With 3, two slow calls out of the last
    three are enough; two fast ones out of three end it."""

    multiple: float = 3.0
    window_s: float = 30.0
    min_samples: int = 3
    floor_s: float = 1.0
    cold_s: float = 3.0


@dataclass(frozen=True)
class HedgePolicy:
    """A covered workload's first-token deadline and hedging budget (``server.failover``).

    ``deadline_s`` None is ``"auto"``: the p95 of this upstream's recent first-content-token
    latencies for the workload (streamed and not streamed apart) × ``margin``, clamped to
    ``[min_s, max_s]``; ``max_s`` until ``MIN_SAMPLES`` exist. ``budget``: the share of the
    local model's slots that hedges may hold at once (at least one)."""

    deadline_s: float | None = None
    min_s: float = 2.0
    max_s: float = 3.5
    margin: float = 1.5
    budget: float = 0.2


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    api_key: str = field(default="", repr=False)
    api_key_env: str | None = None
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    read_timeout_s: float = 30.0
    probe_interval_s: float = 5.0
    probe_interval_open_s: float = 1.0
    probe_timeout_s: float = 2.0
    default: bool = False
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    slow: SlowPolicy = field(default_factory=SlowPolicy)


DEFAULT_OUTPUT_TEMPLATE = '{"label": "{label}", "confidence": {confidence}}'


@dataclass(frozen=True)
class WorkloadConfig:
    name: str
    models: tuple[str, ...] = ()
    upstream: str | None = None
    cloud_model: str | None = None
    fallback: str = "none"
    local_model: str | None = None
    system_prompt: str | None = None
    """Put first when the local model (an LLM) answers for this workload."""
    cloud_system_prompt: str | None = None
    """Put first in the messages sent to the cloud (e.g. asking for the local template's JSON)."""
    priority: str = "normal"
    """Class in the local engines' queues: high, normal or low (``models.priority``)."""
    output_template: str = DEFAULT_OUTPUT_TEMPLATE
    """How a classifier's decision becomes a chat answer's content (``server.workloads.triage``)."""
    local_notice: str | None = None
    """A visible line appended to free-text local answers (never to JSON-template answers)."""
    local_only: bool = False
    """A built-in workload: always served locally, whatever upstreams exist."""
    summary_method: str | None = None
    """``extractive`` or ``abstractive``: a summaries workload (``server.workloads.summaries``)."""
    embedding_model: str | None = None
    """Summaries: the embedding model that picks sentences and checks an LLM's (default minilm-l6-v2)."""
    max_words: int = 150
    """Summaries: the default length of a summary."""
    hedge: HedgePolicy = field(default_factory=HedgePolicy)
    """Covered workloads: the first-token deadline after which the local answer is started too."""
    shadow_rate: float = 0.0
    """Covered classifier or summaries workloads: the share of cloud answers also answered locally
    in the background, to measure agreement (``server.shadow``)."""
    target_p95_s: float | None = None
    """Covered workloads: the p95 latency a drill holds the local answers to (``server.drill``);
    None: 1 s for a classifier, 5 s otherwise."""

    @property
    def covered(self) -> bool:
        return self.fallback == "local"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    models: tuple[ModelSpec, ...] = ()
    upstreams: tuple[UpstreamConfig, ...] = ()
    workloads: tuple[WorkloadConfig, ...] = ()
    source: Path | None = None

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), self.upstreams[0] if self.upstreams else None)


_TYPES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _take(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{where}.{key}", "required")
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}.{key}", f"expected {_TYPES.get(kind, kind.__name__)}, got {value!r}")
    return value


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _positive(value: Any, key: str) -> Any:
    if value is not None and value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value}")
    return value


def _nonnegative(value: Any, key: str) -> Any:
    if value is not None and value < 0:
        raise ConfigError(key, f"must be 0 or more, got {value}")
    return value


def _path(raw: str, base: Path) -> Path:
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p).resolve()


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    return is_loopback(urlsplit(url).hostname or "")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server(table: dict[str, Any], base: Path, env: dict[str, str]) -> ServerConfig:
    where = "server"
    _no_unknown(table, {"host", "port", "embedded_models", "api_key_env", "log_level", "state_dir", "cache_dir",
                        "max_drill_s", "key_file", "allowed_hosts", "tls_cert", "tls_key", "log_format", "drain_grace_s",
                        "drain_timeout_s", "journal_retention_days", "models_file"}, where)
    port = _take(table, "port", int, where, 8080)
    if not 0 < port < 65536:
        raise ConfigError("server.port", f"must be between 1 and 65535, got {port}")
    keys: tuple[str, ...] = tuple(k.strip() for k in env.get("UNDERSTUDY_API_KEYS", "").split(",") if k.strip())
    key_env = _take(table, "api_key_env", str, where)
    if key_env is not None:
        named = tuple(k.strip() for k in env.get(key_env, "").split(",") if k.strip())
        if not named:
            raise ConfigError("server.api_key_env", f"environment variable {key_env} is empty or not set")
        keys = tuple(dict.fromkeys(keys + named))
    key_file = _take(table, "key_file", str, where)
    hosts = _take(table, "allowed_hosts", list, where)
    if hosts is not None and not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("server.allowed_hosts", "must be a list of host names (\"*\" for any)")
    tls = (_take(table, "tls_cert", str, where), _take(table, "tls_key", str, where))
    if (tls[0] is None) != (tls[1] is None):
        raise ConfigError("server.tls_cert", "tls_cert and tls_key go together")
    fmt = _take(table, "log_format", str, where, "text")
    if fmt not in ("text", "json"):
        raise ConfigError("server.log_format", f"must be 'text' or 'json', got {fmt!r}")
    level = _take(table, "log_level", str, where, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("server.log_level", f"must be debug, info, warning or error, got {level!r}")
    return ServerConfig(
        host=_take(table, "host", str, where, "127.0.0.1"),
        port=port,
        embedded_models=_take(table, "embedded_models", bool, where, True),
        api_keys=keys,
        log_level=level,
        state_dir=_path(_take(table, "state_dir", str, where, ".understudy"), base),
        cache_dir=_path(cache, base) if (cache := _take(table, "cache_dir", str, where)) is not None else None,
        max_drill_s=_positive(_take(table, "max_drill_s", float, where, 3600.0), "server.max_drill_s"),
        admin_key=env.get("UNDERSTUDY_ADMIN_KEY") or None,
        metrics_key=env.get("UNDERSTUDY_METRICS_KEY") or None,
        key_file=_path(key_file, base) if key_file else None,
        allowed_hosts=tuple(h.lower() for h in hosts) if hosts is not None else None,
        tls_cert=_path(tls[0], base) if tls[0] else None,
        tls_key=_path(tls[1], base) if tls[1] else None,
        log_format=fmt,
        drain_grace_s=_nonnegative(_take(table, "drain_grace_s", float, where, 5.0), "server.drain_grace_s"),
        drain_timeout_s=_positive(_take(table, "drain_timeout_s", float, where, 30.0), "server.drain_timeout_s"),
        journal_retention_days=_positive(_take(table, "journal_retention_days", float, where, 90.0),
                                         "server.journal_retention_days"),
        models_file=_path(models_file, base) if (models_file := _take(table, "models_file", str, where)) else None,
    )


_OPTION_TYPES: dict[str, type] = {
    "threads": int, "gpu_layers": int, "slots": int, "kv_tokens": int, "kv_unified": bool, "batch_tokens": int,
    "max_waiting": int, "queue_timeout_s": float, "max_batch_requests": int, "max_batch_tokens": int,
    "batch_wait_ms": float, "batch_fill_wait_ms": float,
}
_MODEL_KEYS = {"kind", "format", "path", "sha256", "context_length", "tokenizer", "tokenizer_sha256"} | set(_OPTION_TYPES)
_CHAT_ONLY = {"gpu_layers", "slots", "kv_tokens", "kv_unified", "batch_tokens"}
_EMBEDDING_ONLY = {"max_batch_requests", "max_batch_tokens", "batch_wait_ms", "batch_fill_wait_ms", "tokenizer", "tokenizer_sha256"}


def _options(table: dict[str, Any], where: str, base: EngineOptions) -> EngineOptions:
    changes: dict[str, Any] = {}
    for key, kind in _OPTION_TYPES.items():
        value = _take(table, key, kind, where)
        if value is None:
            continue
        if key == "gpu_layers":
            if value < -1:
                raise ConfigError(f"{where}.{key}", "must be -1 (all), 0 (none) or a layer count")
        elif kind is not bool and key not in ("batch_wait_ms", "batch_fill_wait_ms"):
            _positive(value, f"{where}.{key}")
        elif key in ("batch_wait_ms", "batch_fill_wait_ms") and value < 0:
            raise ConfigError(f"{where}.{key}", "must be 0 or more")
        changes[key] = value
    return replace(base, **changes)


def _is_classifier(table: Any, inherited: ModelSpec | None) -> bool:
    if isinstance(table, dict) and "kind" in table:
        return table["kind"] == ModelKind.CLASSIFIER.value
    return inherited is not None and inherited.kind is ModelKind.CLASSIFIER


def _model(model_id: str, table: dict[str, Any], base: Path, embedded: dict[str, ModelSpec],
           specs: dict[str, ModelSpec]) -> ModelSpec:
    where = f"models.{model_id}"
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table ([models.<id>] with path, sha256, ...)")
    inherited = embedded.get(model_id)
    if _is_classifier(table, inherited):
        from server.config_classifier import parse_classifier

        return parse_classifier(model_id, table, base, inherited, specs)
    _no_unknown(table, _MODEL_KEYS, where)
    path_raw = _take(table, "path", str, where, required=inherited is None)
    path = _path(path_raw, base) if path_raw is not None else (inherited.path if inherited else None)
    sha = _take(table, "sha256", str, where, required=inherited is None)
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise ConfigError(f"{where}.sha256", "must be 64 hexadecimal characters")
    kind_raw = _take(table, "kind", str, where, inherited.kind.value if inherited else None, required=inherited is None)
    try:
        kind = ModelKind(kind_raw)
    except ValueError:
        raise ConfigError(f"{where}.kind", f"must be 'chat', 'embedding' or 'classifier', got {kind_raw!r}") from None
    default_format = inherited.format.value if inherited else ("onnx" if str(path).endswith(".onnx") else "gguf")
    fmt_raw = _take(table, "format", str, where, default_format)
    try:
        fmt = ModelFormat(fmt_raw)
    except ValueError:
        raise ConfigError(f"{where}.format", f"must be 'gguf' or 'onnx', got {fmt_raw!r}") from None
    if (kind is ModelKind.CHAT) != (fmt is ModelFormat.GGUF):
        raise ConfigError(f"{where}.format", "chat models are GGUF files, embedding models are ONNX files")
    wrong = _EMBEDDING_ONLY if kind is ModelKind.CHAT else _CHAT_ONLY
    for key in table:
        if key in wrong:
            raise ConfigError(f"{where}.{key}", f"does not apply to {kind.value} models")
    tokenizer_raw = _take(table, "tokenizer", str, where)
    tokenizer = _path(tokenizer_raw, base) if tokenizer_raw else (inherited.tokenizer_path if inherited else None)
    tokenizer_sha = _take(table, "tokenizer_sha256", str, where, inherited.tokenizer_sha256 if inherited else None)
    if fmt is ModelFormat.ONNX and (tokenizer is None or not tokenizer_sha):
        raise ConfigError(f"{where}.tokenizer", "ONNX models need tokenizer (a tokenizer.json) and tokenizer_sha256")
    context = _positive(_take(table, "context_length", int, where), f"{where}.context_length")
    return ModelSpec(
        id=model_id,
        kind=kind,
        format=fmt,
        path=path,
        sha256=(sha or (inherited.sha256 if inherited else "")).lower(),
        context_length=context if context is not None else (inherited.context_length if inherited else None),
        tokenizer_path=tokenizer,
        tokenizer_sha256=tokenizer_sha,
        options=_options(table, where, inherited.options if inherited else EngineOptions()),
        source="config" if inherited is None else "embedded (overridden)",
        missing_hint=inherited.missing_hint if inherited and path_raw is None else "",
    )


_UPSTREAM_FLOATS = ("connect_timeout_s", "first_byte_timeout_s", "read_timeout_s", "probe_interval_s",
                    "probe_interval_open_s", "probe_timeout_s")
_SLOW_KEYS: dict[str, tuple[str, type]] = {
    "slow_multiple": ("multiple", float), "slow_window_s": ("window_s", float), "slow_min_samples": ("min_samples", int),
    "slow_floor_s": ("floor_s", float), "slow_cold_s": ("cold_s", float),
}
_HEDGE_KEYS: dict[str, tuple[str, type]] = {
    "deadline_min_s": ("min_s", float), "deadline_max_s": ("max_s", float), "deadline_margin": ("margin", float),
    "hedge_budget": ("budget", float),
}
_BREAKER_KEYS: dict[str, type] = {
    "failure_threshold": int, "failure_rate": float, "failure_window_s": float, "failure_min_calls": int,
    "open_base_s": float, "open_max_s": float,
}


def _upstream(i: int, table: Any, env: dict[str, str]) -> UpstreamConfig:
    where = f"upstreams[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table ([[upstreams]] with name and base_url)")
    _no_unknown(table, {"name", "base_url", "api_key_env", "default", "allow_plain_http", *_UPSTREAM_FLOATS, *_BREAKER_KEYS,
                        *_SLOW_KEYS}, where)
    name = _take(table, "name", str, where, required=True)
    url = _take(table, "base_url", str, where, required=True).rstrip("/")
    if not url.startswith(("http://", "https://")) or not url.endswith("/v1"):
        raise ConfigError(f"{where}.base_url", f"must be an http(s) URL ending in /v1, got {url!r}")
    if url.startswith("http://") and not _is_loopback_url(url) and not _take(table, "allow_plain_http", bool, where, False):
        raise ConfigError(f"{where}.base_url", "plain http:// to a host beyond loopback would send prompts and the API key "
                                               "unencrypted; use https://, or set allow_plain_http = true (a TLS proxy on the same host)")
    key_env = _take(table, "api_key_env", str, where)
    key = ""
    if key_env is not None:
        key = env.get(key_env, "")
        if not key:
            raise ConfigError(f"{where}.api_key_env", f"environment variable {key_env} is empty or not set")
    floats = {k: _positive(_take(table, k, float, where), f"{where}.{k}") for k in _UPSTREAM_FLOATS}
    breaker = {k: _positive(_take(table, k, kind, where), f"{where}.{k}") for k, kind in _BREAKER_KEYS.items()}
    if breaker["failure_rate"] is not None and breaker["failure_rate"] > 1:
        raise ConfigError(f"{where}.failure_rate", "must be between 0 and 1")
    names = {"failure_window_s": "window_s", "failure_min_calls": "min_calls"}
    breaker_config = replace(BreakerConfig(), **{names.get(k, k): v for k, v in breaker.items() if v is not None})
    slow = {attr: _positive(_take(table, k, kind, where), f"{where}.{k}") for k, (attr, kind) in _SLOW_KEYS.items()}
    if slow["multiple"] is not None and slow["multiple"] <= 1:
        raise ConfigError(f"{where}.slow_multiple", f"must be greater than 1, got {slow['multiple']}")
    return UpstreamConfig(
        name=name, base_url=url, api_key=key, api_key_env=key_env, default=_take(table, "default", bool, where, False),
        breaker=breaker_config, slow=replace(SlowPolicy(), **{k: v for k, v in slow.items() if v is not None}),
        **{k: v for k, v in floats.items() if v is not None},
    )


def _hedge(table: dict[str, Any], where: str, covered: bool) -> HedgePolicy:
    keys = ["first_token_deadline_s", *_HEDGE_KEYS]
    if not covered:
        for key in keys:
            if key in table:
                raise ConfigError(f"{where}.{key}", "only applies to a covered workload (fallback = 'local'); an uncovered "
                                  "one waits for its upstream's own timeouts")
        return HedgePolicy()
    raw = table.get("first_token_deadline_s", "auto")
    deadline: float | None = None
    if raw != "auto":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{where}.first_token_deadline_s", f"expected a number of seconds or \"auto\", got {raw!r}")
        deadline = _positive(float(raw), f"{where}.first_token_deadline_s")
    values = {attr: _positive(_take(table, k, kind, where), f"{where}.{k}") for k, (attr, kind) in _HEDGE_KEYS.items()}
    policy = replace(HedgePolicy(deadline_s=deadline), **{k: v for k, v in values.items() if v is not None})
    if policy.min_s > policy.max_s:
        raise ConfigError(f"{where}.deadline_min_s", f"must not be above deadline_max_s ({policy.min_s:g} > {policy.max_s:g})")
    if policy.budget > 1:
        raise ConfigError(f"{where}.hedge_budget", f"is a share of the local slots, between 0 and 1, got {policy.budget:g}")
    return policy


def _workload(i: int, table: Any, upstreams: dict[str, UpstreamConfig], models: dict[str, ModelSpec]) -> WorkloadConfig:
    where = f"workloads[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table ([[workloads]] with name, ...)")
    _no_unknown(table, {"name", "models", "upstream", "cloud_model", "fallback", "local_model", "system_prompt",
                        "cloud_system_prompt", "priority", "output_template", "local_notice", "summary_method",
                        "embedding_model", "max_words", "first_token_deadline_s", "target_p95_s", "shadow_rate",
                        *_HEDGE_KEYS}, where)
    name = _take(table, "name", str, where, required=True)
    names = _take(table, "models", list, where, [])
    if not all(isinstance(m, str) and m for m in names):
        raise ConfigError(f"{where}.models", "must be a list of model names")
    upstream = _take(table, "upstream", str, where)
    if upstream is not None and upstream not in upstreams:
        raise ConfigError(f"{where}.upstream", f"no upstream named {upstream!r}")
    fallback = _take(table, "fallback", str, where, "none")
    if fallback not in ("local", "none"):
        raise ConfigError(f"{where}.fallback", f"must be 'local' or 'none', got {fallback!r}")
    local_model = _take(table, "local_model", str, where)
    if fallback != "local" and local_model is not None:
        raise ConfigError(f"{where}.local_model", "is only used with fallback = 'local'")
    if fallback == "local":
        if local_model is None:
            raise ConfigError(f"{where}.local_model", "required when fallback = 'local'")
        if local_model not in models:
            raise ConfigError(f"{where}.local_model", f"no model {local_model!r} in the catalog ({', '.join(models)})")
    if not upstreams and fallback != "local":
        raise ConfigError(f"{where}.fallback", "with no [[upstreams]], a workload can only be served locally ('local')")
    priority = _take(table, "priority", str, where, "normal")
    if priority not in WORKLOAD_PRIORITIES:
        raise ConfigError(f"{where}.priority", f"must be one of {', '.join(WORKLOAD_PRIORITIES)}, got {priority!r}")
    classifier = local_model is not None and models[local_model].kind is ModelKind.CLASSIFIER
    template = _take(table, "output_template", str, where)
    notice = _take(table, "local_notice", str, where)
    if template is not None and not classifier:
        raise ConfigError(f"{where}.output_template", "only applies when local_model is a classifier")
    if classifier:
        from server.workloads.triage import check_template, is_json_template

        template = template if template is not None else DEFAULT_OUTPUT_TEMPLATE
        problem = check_template(template, models[local_model].classifier.labels)  # type: ignore[union-attr]
        if problem:
            raise ConfigError(f"{where}.output_template", problem)
        if notice is not None and is_json_template(template):
            raise ConfigError(f"{where}.local_notice", "is off for a JSON output_template (it would break the JSON)")
    if notice is not None and not notice.strip():
        raise ConfigError(f"{where}.local_notice", "must not be empty")
    method, embedding, max_words = _summaries(table, where, local_model, models, classifier)
    return WorkloadConfig(
        name=name, models=tuple(names), upstream=upstream, cloud_model=_take(table, "cloud_model", str, where),
        fallback=fallback, local_model=local_model, system_prompt=_take(table, "system_prompt", str, where),
        cloud_system_prompt=_take(table, "cloud_system_prompt", str, where), priority=priority,
        output_template=template or DEFAULT_OUTPUT_TEMPLATE, local_notice=notice,
        summary_method=method, embedding_model=embedding, max_words=max_words,
        hedge=_hedge(table, where, fallback == "local"),
        target_p95_s=_positive(_take(table, "target_p95_s", float, where, 1.0 if classifier else None), f"{where}.target_p95_s"),
        shadow_rate=_shadow_rate(table, where, fallback == "local", classifier or method is not None),
    )


def _shadow_rate(table: dict[str, Any], where: str, covered: bool, comparable: bool) -> float:
    rate = _take(table, "shadow_rate", float, where, 0.0)
    if rate == 0.0:
        return rate
    if not 0 < rate <= 1:
        raise ConfigError(f"{where}.shadow_rate", f"is a share of the cloud answers, between 0 and 1, got {rate:g}")
    if not covered:
        raise ConfigError(f"{where}.shadow_rate", "only applies to a covered workload (fallback = 'local')")
    if not comparable:
        raise ConfigError(f"{where}.shadow_rate", "shadow mode compares classifier labels or summaries: local_model must be "
                          "a classifier, or summary_method set")
    return rate


def _summaries(table: dict[str, Any], where: str, local_model: str | None, models: dict[str, ModelSpec],
               classifier: bool) -> tuple[str | None, str | None, int]:
    method = _take(table, "summary_method", str, where)
    embedding = _take(table, "embedding_model", str, where)
    max_words = _take(table, "max_words", int, where, 150)
    if method is None:
        for key in ("embedding_model", "max_words"):
            if key in table:
                raise ConfigError(f"{where}.{key}", "only applies with summary_method")
        return None, None, max_words
    if method not in ("extractive", "abstractive"):
        raise ConfigError(f"{where}.summary_method", f"must be 'extractive' or 'abstractive', got {method!r}")
    if classifier:
        raise ConfigError(f"{where}.summary_method", "a classifier cannot summarise; local_model must be a chat model")
    if not 1 <= max_words <= 5000:
        raise ConfigError(f"{where}.max_words", f"must be between 1 and 5000, got {max_words}")
    local_kind = models[local_model].kind if local_model is not None else None
    if local_kind is ModelKind.EMBEDDING:  # extractive only: the local model is the embedder itself
        embedding = embedding or local_model
    embedding = embedding or (MINILM_ID if MINILM_ID in models else None)
    if embedding is None or embedding not in models or models[embedding].kind is not ModelKind.EMBEDDING:
        raise ConfigError(f"{where}.embedding_model", f"no embedding model {embedding!r} in the catalog")
    if method == "abstractive" and local_kind is not ModelKind.CHAT:
        raise ConfigError(f"{where}.local_model", "abstractive summaries need a chat model as local_model")
    return method, embedding, max_words


def builtin_workloads(specs: dict[str, ModelSpec]) -> list[WorkloadConfig]:
    """What the embedded catalog covers with no config at all, each present whenever its models are:
    ``triage``, served locally by the ``triage-minilm`` classifier, first in the local queues;
    ``summaries``, extractive over ``minilm-l6-v2`` (abstractive on request, with SmolLM2)."""
    out = []
    if TRIAGE_ID in specs:
        out.append(WorkloadConfig(name="triage", fallback="local", local_model=TRIAGE_ID, priority="high", local_only=True))
    if MINILM_ID in specs:
        chat = SMOLLM2_ID if SMOLLM2_ID in specs else MINILM_ID
        out.append(WorkloadConfig(name="summaries", fallback="local", local_model=chat, local_only=True,
                                  summary_method="extractive", embedding_model=MINILM_ID))
    return out


def _tables(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array of tables ([[{key}]])")
    return value


def parse_config(data: dict[str, Any], base: Path, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    _no_unknown(data, {"server", "models", "upstreams", "workloads"}, "(top level)")
    server_table = data.get("server", {})
    if not isinstance(server_table, dict):
        raise ConfigError("server", "must be a table")
    server = _server(server_table, base, env)
    embedded = {s.id: s for s in default_catalog()} if server.embedded_models else {}
    models_table = data.get("models", {})
    if not isinstance(models_table, dict):
        raise ConfigError("models", "must be a table of [models.<id>] tables")
    specs = dict(embedded)
    # Classifiers last: they name an embedding model that must already be in the catalog.
    ordered = sorted(models_table.items(), key=lambda kv: _is_classifier(kv[1], embedded.get(kv[0])))
    for model_id, table in ordered:
        specs[model_id] = _model(model_id, table, base, embedded, specs)
    if not specs:
        raise ConfigError("models", "no model left: embedded_models is false and no [models.<id>] is given")
    upstreams: dict[str, UpstreamConfig] = {}
    for i, table in enumerate(_tables(data, "upstreams")):
        up = _upstream(i, table, env)
        if up.name in upstreams:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate upstream name {up.name!r}")
        upstreams[up.name] = up
    if sum(1 for u in upstreams.values() if u.default) > 1:
        raise ConfigError("upstreams", "only one upstream may have default = true")
    workloads: list[WorkloadConfig] = []
    claimed: dict[str, str] = {}
    for i, table in enumerate(_tables(data, "workloads")):
        wl = _workload(i, table, upstreams, specs)
        for name in dict.fromkeys((wl.name, *wl.models)):
            if name in claimed:
                raise ConfigError(f"workloads[{i}]", f"{name!r} already belongs to workload {claimed[name]!r}")
            if name in specs:
                raise ConfigError(f"workloads[{i}]", f"{name!r} is a local model id; a workload needs its own names")
            claimed[name] = wl.name
        workloads.append(wl)
    for wl in builtin_workloads(specs):
        if wl.name not in claimed:  # a user's [[workloads]] of the same name replaces the built-in one
            workloads.append(wl)
    return Config(server=server, models=tuple(specs.values()), upstreams=tuple(upstreams.values()), workloads=tuple(workloads))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("--config", f"file {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def merge_tables(into: dict[str, Any], extra: dict[str, Any], into_name: str, extra_name: str, where: str = "") -> dict[str, Any]:
    """Merge a config fragment into a config: tables merge key by key, arrays of tables
    (``[[upstreams]]``, ``[[workloads]]``) are appended, and a value set in both to different
    values is a ``ConfigError`` naming the key and both files (an explicit setting is never
    silently replaced). The same value in both is fine. Returns a new dict."""
    out = dict(into)
    for key, value in extra.items():
        dotted = f"{where}.{key}" if where else key
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_tables(out[key], value, into_name, extra_name, dotted)
        elif isinstance(out[key], list) and isinstance(value, list) and key in ("upstreams", "workloads"):
            out[key] = out[key] + value
        elif out[key] != value:
            raise ConfigError(dotted, f"is {out[key]!r} in {into_name} and {value!r} in {extra_name}: the files conflict; "
                                      "remove it from one of them")
    return out


def config_data(path: Path | list[Path] | None, env: dict[str, str] | None = None) -> tuple[dict[str, Any], Path, str]:
    """The merged TOML tables of the config files (without the pulled models' catalog), the folder
    relative paths resolve against, and the files' names ("" for none: the embedded default).
    ``path`` as for ``load_config``."""
    env = dict(os.environ) if env is None else env
    paths = [] if path is None else (list(path) if isinstance(path, list) else [path])
    if not paths and env.get("UNDERSTUDY_CONFIG"):
        paths = [Path(env["UNDERSTUDY_CONFIG"])]
    if not paths:
        return {}, Path.cwd(), ""
    data = _read_toml(paths[0])
    for earlier, later in zip(paths, paths[1:]):
        data = merge_tables(data, _read_toml(later), str(paths[0]) if earlier is paths[0] else "the files before it", str(later))
    return data, paths[0].resolve().parent, " + ".join(map(str, paths))


def state_dir_of(data: dict[str, Any], base: Path) -> Path:
    """``[server] state_dir`` of a config not parsed yet (``ServerConfig.state_dir`` once it is)."""
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server", "must be a table")
    return _path(_take(server, "state_dir", str, "server", ".understudy"), base)


def catalog_file(data: dict[str, Any], base: Path) -> Path:
    """Where the pulled models' catalog of this config is: ``[server] models_file``, else
    ``<state_dir>/models.toml`` (``ServerConfig.catalog_file``, before the config is parsed)."""
    named = _take(data.get("server", {}) if isinstance(data.get("server"), dict) else {}, "models_file", str, "server")
    if named is not None:
        return _path(named, base)
    return state_dir_of(data, base) / CATALOG_FILE


def read_catalog(path: Path) -> dict[str, dict[str, Any]]:
    """The ``[models.<id>]`` tables of a pulled models' catalog (none while it does not exist),
    with relative ``path``/``tokenizer`` values made absolute against the catalog's folder."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(str(path), f"the models file cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    for key in data:
        if key != "models":
            raise ConfigError(f"{path}: {key}", "a models file holds only [models.<id>] tables")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: models", "must be a table of [models.<id>] tables")
    out: dict[str, dict[str, Any]] = {}
    folder = path.resolve().parent
    for model_id, table in models.items():
        if not isinstance(table, dict):
            raise ConfigError(f"models.{model_id}", f"must be a table (in {path})")
        table = dict(table)
        for key in ("path", "tokenizer"):
            if isinstance(table.get(key), str):
                table[key] = str(_path(table[key], folder))
        out[model_id] = table
    return out


def with_catalog(data: dict[str, Any], name: str, catalog: Path, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config's tables with the catalog's models merged in like ``[models.<id>]`` tables of
    one more config file: a key set in both to different values is a ``ConfigError`` naming both
    files (a model defined in the config wins nothing silently); other keys combine, so the config
    may tune a pulled model (``[models.<id>] slots = 4``)."""
    if not models:
        return data
    return merge_tables(data, {"models": models}, name or "the embedded default", f"{catalog} (the pulled models)")


def load_config(path: Path | list[Path] | None, env: dict[str, str] | None = None) -> Config:
    """``path``: one file, several (``understudy serve --config base.toml --config tuned.toml``:
    merged with ``merge_tables``; relative paths in any of them resolve against the first file's
    folder), or None for ``$UNDERSTUDY_CONFIG``, else the embedded default. The pulled models'
    catalog (``catalog_file``) is merged in too."""
    env = dict(os.environ) if env is None else env
    data, base, name = config_data(path, env)
    catalog = catalog_file(data, base)
    pulled = read_catalog(catalog)
    config = parse_config(with_catalog(data, name, catalog, pulled), base, env)
    if pulled:
        hint = f"pull it again with `understudy models pull` (the comment above its table in {catalog} names the URL)"
        config = replace(config, models=tuple(replace(m, source="pulled", missing_hint=m.missing_hint or hint)
                                              if m.id in pulled else m for m in config.models))
    return replace(config, source=Path(name)) if name else config


def with_overrides(config: Config, host: str | None = None, port: int | None = None) -> Config:
    server = config.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        if not 0 < port < 65536:
            raise ConfigError("--port", f"must be between 1 and 65535, got {port}")
        server = replace(server, port=port)
    return replace(config, server=server)

