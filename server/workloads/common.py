"""What the workloads share: the input size limit and the chat request's text to work on."""

from __future__ import annotations

from server.errors import InvalidRequest
from server.schemas import ChatCompletionRequest

MAX_INPUT_CHARS = 400_000
"""About 100 pages of text: long inputs are chunked, never refused; past this, a 400."""


def last_user_text(req: ChatCompletionRequest, who: str) -> str:
    """The last user message, which a workload answers (``who`` names the workload in errors)."""
    text = next((m.text() for m in reversed(req.messages) if m.role == "user"), None)
    if text is None or not text.strip():
        raise InvalidRequest(f"{who} answers the last user message, and this request has none (or it is empty).",
                             param="messages")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidRequest(f"The last user message has {len(text)} characters; at most {MAX_INPUT_CHARS} are accepted.",
                             param="messages")
    return text
