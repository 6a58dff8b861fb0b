"""OpenAI wire format: response bodies and SSE chunks, built with as little per-token work as possible.

Used on the event-loop thread by ``server.local``. A ``ChunkWriter`` pre-renders the constant
part of every streaming chunk once per request, so each token costs one ``json.dumps`` of its text.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def completion_body(chat: bool, rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed answer: ``chat.completion`` (chat) or ``text_completion``."""
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=None, finish_reason=finish)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
        "system_fingerprint": None,
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_error(message: str, code: str, kind: str = "server_error") -> bytes:
    return sse({"error": {"message": message, "type": kind, "param": None, "code": code}})


class ChunkWriter:
    """Streaming chunks of one request (chat: ``chat.completion.chunk``; completions: ``text_completion``)."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool, marker: dict[str, Any] | None = None) -> None:
        self.chat = chat
        self.include_usage = include_usage
        # The provenance marker rides on the stream's last chunk (finish, or usage when asked for).
        self._marker = f',"understudy":{json.dumps(marker, separators=(",", ":"))}' if marker else ""
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "system_fingerprint": None}
        self._head = json.dumps(head, separators=(",", ":"))[:-1]  # without the closing brace
        tail_usage = ',"usage":null' if include_usage else ""
        if chat:
            self._pre = f'data: {self._head},"choices":[{{"index":0,"delta":{{"content":'.encode()
            self._post = f'}},"logprobs":null,"finish_reason":null}}]{tail_usage}}}\n\n'.encode()
        else:
            self._pre = f'data: {self._head},"choices":[{{"index":0,"text":'.encode()
            self._post = f',"logprobs":null,"finish_reason":null}}]{tail_usage}}}\n\n'.encode()
        self._usage_tail = tail_usage

    def first(self) -> bytes:
        """Chat streams open with the assistant role (OpenAI sends it in its own chunk)."""
        if not self.chat:
            return b""
        return f'data: {self._head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]{self._usage_tail}}}\n\n'.encode()

    def text(self, text: str) -> bytes:
        return self._pre + json.dumps(text).encode() + self._post

    def finish(self, reason: str) -> bytes:
        if self.chat:
            choice = f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}'
        else:
            choice = f'{{"index":0,"text":"","logprobs":null,"finish_reason":"{reason}"}}'
        marker = "" if self.include_usage else self._marker
        return f'data: {self._head},"choices":[{choice}]{self._usage_tail}{marker}}}\n\n'.encode()

    def usage(self, use: dict[str, Any]) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{json.dumps(use, separators=(",", ":"))}{self._marker}}}\n\n'.encode()
