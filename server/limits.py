"""Request limits that do not depend on a model: JSON shape, per-key token caps, per-key rate.

- ``check_json_shape(body)``: nesting deeper than ``MAX_JSON_DEPTH`` or more than
  ``MAX_JSON_ITEMS`` values is a 400 (never a 500: a body of 100,000 nested arrays used to
  crash the parser). Iterative, so it cannot itself recurse too deep.
- ``check_key_caps(key, body)``: a key's ``max_tokens`` and ``max_prompt_tokens``. Prompt tokens
  are estimated before any tokenizer runs (the cloud's is unknown here) as the UTF-8 bytes of the
  text fields divided by 4, the usual ratio for English with OpenAI and Llama tokenizers: a cap
  is a guard against abuse, not a bill.
- ``RateLimiter``: a token bucket per key (``Key.rpm``, ``Key.burst``). Pure given its clock.

Callers: ``server.edge.Edge`` (rate), ``server.app``'s ``dispatch`` (shape and caps), on the
event-loop thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from server.errors import InvalidRequest, Overloaded
from server.keys import Key

MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 100_000
_TEXT_FIELDS = ("messages", "prompt", "input", "text", "content")


def check_json_shape(body: Any) -> None:
    stack: list[tuple[Any, int]] = [(body, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            items += 1
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
        if items > MAX_JSON_ITEMS:
            raise InvalidRequest(f"The JSON body has more than {MAX_JSON_ITEMS} values.", code="invalid_json")


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text, with 4 per token id (a prompt given as token ids)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for k, v in value.items() if k in _TEXT_FIELDS or k in ("arguments", "tool_calls"))
    return 0


def estimated_prompt_tokens(body: dict[str, Any]) -> int:
    """Text fields and token ids, plus the tool definitions (relayed to the cloud as they are)."""
    tools = len(json.dumps(body.get("tools"))) if body.get("tools") else 0
    return (sum(_text_bytes(body.get(k)) for k in _TEXT_FIELDS) + tools) // 4


def lax_number(value: Any) -> float | None:
    """What the request schema's lax parsing will read as a number (``100``, ``100.0``, ``"100"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def check_key_caps(key: Key | None, body: dict[str, Any]) -> bool:
    """True when it set ``body["max_tokens"]`` (the caller re-encodes the body the cloud gets): a
    capped key's chat request that names no limit (absent or null), or a completion whose
    ``max_tokens`` is null, gets the cap as its limit, never the whole context. (An absent
    completions ``max_tokens`` is OpenAI's 16.)"""
    if key is None:
        return False
    changed = False
    if key.max_tokens is not None and ("messages" in body or "prompt" in body):
        asked_any = False
        for name in ("max_tokens", "max_completion_tokens"):
            asked = lax_number(body.get(name))
            if asked is None:
                continue  # absent, null, or a type the schema refuses with its own 400
            asked_any = True
            if not asked <= key.max_tokens:
                raise InvalidRequest(f"{name} = {body[name]} is more than this API key may ask for ({key.max_tokens}).",
                                     param=name, code="key_limit_exceeded")
        if not asked_any and ("messages" in body or "max_tokens" in body):
            body["max_tokens"] = key.max_tokens
            changed = True
    if key.max_prompt_tokens is not None:
        estimate = estimated_prompt_tokens(body)
        if estimate > key.max_prompt_tokens:
            raise InvalidRequest(f"The prompt is about {estimate} tokens, more than this API key may send "
                                 f"({key.max_prompt_tokens}).", code="key_limit_exceeded")
    return changed


class RateLimiter:
    """Token buckets by key id. ``take(key)`` returns None (go) or the seconds until a request
    would be admitted (for Retry-After). Buckets follow a key file reload by id."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, at)

    def take(self, key: Key) -> float | None:
        if key.rpm is None:
            return None
        rate = key.rpm / 60.0
        burst = float(key.burst or max(1, int(key.rpm // 10)))
        now = self._clock()
        tokens, at = self._buckets.get(key.id, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key.id] = (tokens - 1.0, now)
            return None
        self._buckets[key.id] = (tokens, now)
        return (1.0 - tokens) / rate

    def check(self, key: Key) -> None:
        wait = self.take(key)
        if wait is not None:
            raise Overloaded(f"Rate limit reached for this API key ({key.rpm:g} requests a minute); retry after "
                             f"{wait:.1f} s.", retry_after=wait)
