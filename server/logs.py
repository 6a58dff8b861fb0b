"""Logs without patient text: text or JSON lines, one structured line per request.

``setup_logging(level, fmt)`` (called once by ``understudy serve`` and the other commands)
installs one handler on the root logger, uvicorn's loggers included (they propagate to it). Its
formatters never print an exception's message, only its type and the traceback's frames (file,
line, function): a message may quote the input that caused it (``ValueError(f"bad {text}")``),
and a traceback's frames cannot. ``request_log`` is the ``server.events`` sink that writes the
per-request line: request id, key id (never the key), endpoint, workload, route, model, status,
latency and token counts. Prompt and completion text are never handed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any

from server.events import Event, RouteDone

_REQUEST_FIELDS = ("request_id", "key_id", "endpoint", "workload", "upstream", "route", "model", "reason", "status",
                   "latency_ms", "prompt_tokens", "completion_tokens")
request_logger = logging.getLogger("understudy.request")


def safe_exception(exc_info: Any) -> str:
    """The traceback's frames and the exception's type: never its message."""
    kind, _, tb = exc_info
    frames = "".join(traceback.format_tb(tb)) if tb is not None else ""
    return f"Traceback (most recent call last):\n{frames}{kind.__name__ if kind else 'Exception'} (message withheld: it may quote the input)"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return safe_exception(ei)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = safe_exception(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # httpx logs a line per request at INFO (every probe, every /v1/models); keep it for debug.
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def request_log(ev: Event) -> None:
    """``server.events`` sink: one line per answered or refused request."""
    if isinstance(ev, RouteDone) and request_logger.isEnabledFor(logging.INFO):
        fields = {k: getattr(ev, k) for k in _REQUEST_FIELDS}
        fields["latency_ms"] = round(ev.latency_ms, 1)
        request_logger.info("request", extra={"fields": fields})
