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

from models.catalog import EngineOptions, ModelFormat, ModelKind, ModelSpec, default_catalog


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    embedded_models: bool = True
    api_keys: tuple[str, ...] = ()
    log_level: str = "info"
    log_content: bool = False
    state_dir: Path = Path(".understudy")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    models: tuple[ModelSpec, ...] = ()
    source: Path | None = None


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


def _path(raw: str, base: Path) -> Path:
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p).resolve()


def _server(table: dict[str, Any], base: Path, env: dict[str, str]) -> ServerConfig:
    where = "server"
    _no_unknown(table, {"host", "port", "embedded_models", "api_key_env", "log_level", "log_content", "state_dir"}, where)
    port = _take(table, "port", int, where, 8080)
    if not 0 < port < 65536:
        raise ConfigError("server.port", f"must be between 1 and 65535, got {port}")
    keys: tuple[str, ...] = ()
    key_env = _take(table, "api_key_env", str, where)
    if key_env is not None:
        raw = env.get(key_env, "")
        keys = tuple(k.strip() for k in raw.split(",") if k.strip())
        if not keys:
            raise ConfigError("server.api_key_env", f"environment variable {key_env} is empty or not set")
    level = _take(table, "log_level", str, where, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("server.log_level", f"must be debug, info, warning or error, got {level!r}")
    return ServerConfig(
        host=_take(table, "host", str, where, "127.0.0.1"),
        port=port,
        embedded_models=_take(table, "embedded_models", bool, where, True),
        api_keys=keys,
        log_level=level,
        log_content=_take(table, "log_content", bool, where, False),
        state_dir=_path(_take(table, "state_dir", str, where, ".understudy"), base),
    )


_OPTION_TYPES: dict[str, type] = {
    "threads": int, "gpu_layers": int, "slots": int, "kv_tokens": int, "kv_unified": bool, "batch_tokens": int,
    "max_waiting": int, "queue_timeout_s": float, "max_batch_requests": int, "max_batch_tokens": int,
    "batch_wait_ms": float,
}
_MODEL_KEYS = {"kind", "format", "path", "sha256", "context_length", "tokenizer", "tokenizer_sha256"} | set(_OPTION_TYPES)


def _options(table: dict[str, Any], where: str, base: EngineOptions) -> EngineOptions:
    changes: dict[str, Any] = {}
    for key, kind in _OPTION_TYPES.items():
        value = _take(table, key, kind, where)
        if value is None:
            continue
        if key == "gpu_layers":
            if value < -1:
                raise ConfigError(f"{where}.{key}", "must be -1 (all), 0 (none) or a layer count")
        elif kind is not bool and key != "batch_wait_ms":
            _positive(value, f"{where}.{key}")
        elif key == "batch_wait_ms" and value < 0:
            raise ConfigError(f"{where}.{key}", "must be 0 or more")
        changes[key] = value
    return replace(base, **changes)


def _model(model_id: str, table: dict[str, Any], base: Path, embedded: dict[str, ModelSpec]) -> ModelSpec:
    where = f"models.{model_id}"
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table ([models.<id>] with path, sha256, ...)")
    _no_unknown(table, _MODEL_KEYS, where)
    inherited = embedded.get(model_id)
    path_raw = _take(table, "path", str, where, required=inherited is None)
    path = _path(path_raw, base) if path_raw is not None else (inherited.path if inherited else None)
    sha = _take(table, "sha256", str, where, required=inherited is None)
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise ConfigError(f"{where}.sha256", "must be 64 hexadecimal characters")
    kind_raw = _take(table, "kind", str, where, inherited.kind.value if inherited else None, required=inherited is None)
    try:
        kind = ModelKind(kind_raw)
    except ValueError:
        raise ConfigError(f"{where}.kind", f"must be 'chat' or 'embedding', got {kind_raw!r}") from None
    default_format = inherited.format.value if inherited else ("onnx" if str(path).endswith(".onnx") else "gguf")
    fmt_raw = _take(table, "format", str, where, default_format)
    try:
        fmt = ModelFormat(fmt_raw)
    except ValueError:
        raise ConfigError(f"{where}.format", f"must be 'gguf' or 'onnx', got {fmt_raw!r}") from None
    if (kind is ModelKind.CHAT) != (fmt is ModelFormat.GGUF):
        raise ConfigError(f"{where}.format", "chat models are GGUF files, embedding models are ONNX files")
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


def parse_config(data: dict[str, Any], base: Path, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    _no_unknown(data, {"server", "models"}, "(top level)")
    server_table = data.get("server", {})
    if not isinstance(server_table, dict):
        raise ConfigError("server", "must be a table")
    server = _server(server_table, base, env)
    embedded = {s.id: s for s in default_catalog()} if server.embedded_models else {}
    models_table = data.get("models", {})
    if not isinstance(models_table, dict):
        raise ConfigError("models", "must be a table of [models.<id>] tables")
    specs = dict(embedded)
    for model_id, table in models_table.items():
        specs[model_id] = _model(model_id, table, base, embedded)
    if not specs:
        raise ConfigError("models", "no model left: embedded_models is false and no [models.<id>] is given")
    return Config(server=server, models=tuple(specs.values()))


def load_config(path: Path | None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    if path is None and env.get("UNDERSTUDY_CONFIG"):
        path = Path(env["UNDERSTUDY_CONFIG"])
    if path is None:
        return parse_config({}, Path.cwd(), env)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    config = parse_config(data, path.resolve().parent, env)
    return replace(config, source=path)


def with_overrides(config: Config, host: str | None = None, port: int | None = None) -> Config:
    server = config.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        if not 0 < port < 65536:
            raise ConfigError("--port", f"must be between 1 and 65535, got {port}")
        server = replace(server, port=port)
    return replace(config, server=server)

