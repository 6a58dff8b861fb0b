"""Triage: ``POST /v1/triage`` and chat-shaped classifier answers.

Called by ``server.routing.Router`` on the event-loop thread:
- ``TriageWorkload.api`` for ``POST /v1/triage`` (``{"model"?, "input": str | [str]}``);
- ``TriageWorkload.chat`` when a workload's ``local_model`` is a classifier and the request is a
  chat completion: the last user message is classified and the answer's content is the
  workload's ``output_template`` filled in, streamed or not, so a client that parsed the cloud's
  JSON parses the local one.

Template placeholders (replaced as text; a template that starts with ``{`` or ``[`` must render
to valid JSON, which ``check_template`` verifies at start): ``{label}`` (the label, or
``needs_human_review``), ``{confidence}`` (a number, 2 decimals), ``{abstained}`` (true/false),
``{red_flags}`` (a JSON array), ``{scores}`` (a JSON object).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator
from starlette.responses import JSONResponse, Response

from models.classifier import ABSTAIN_LABEL, Classification, Classified
from server import openai_format as fmt
from server.local import SSE_HEADERS, LocalAnswer, LocalModels, Receive
from server.schemas import ChatCompletionRequest, Text, _Strict
from server.sse import SseResponse
from server.workloads.common import MAX_INPUT_CHARS, last_user_text

MAX_INPUTS = 256

Done = Callable[..., None]


class TriageRequest(_Strict):
    model: str | None = Field(default=None, min_length=1)
    input: Text | list[Text]

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be an empty list")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
        for i, text in enumerate(items):
            if not text.strip():
                raise ValueError(f"input[{i}] is empty" if isinstance(v, list) else "input is empty")
            if len(text) > MAX_INPUT_CHARS:
                raise ValueError(f"input{f'[{i}]' if isinstance(v, list) else ''} has {len(text)} characters; "
                                 f"at most {MAX_INPUT_CHARS} are accepted")
        return v

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def render(template: str, c: Classification) -> str:
    values = {
        "{label}": c.label,
        "{confidence}": f"{c.confidence:.2f}",
        "{abstained}": "true" if c.abstained else "false",
        "{red_flags}": json.dumps(c.red_flags),
        "{scores}": json.dumps({k: round(v, 4) for k, v in c.scores.items()}),
    }
    out = template
    for key, value in values.items():
        out = out.replace(key, value)
    return out


def is_json_template(template: str) -> bool:
    """A template that renders JSON (``check_template`` holds it to that)."""
    return template.lstrip().startswith(("{", "["))


def check_template(template: str, labels: tuple[str, ...]) -> str | None:
    """A problem with ``template`` (for a config error), or None."""
    if "{label}" not in template:
        return "must contain {label}"
    if is_json_template(template):
        for label in (*labels, ABSTAIN_LABEL):
            sample = Classification(label, 0.5, {lab: 0.25 for lab in labels}, label == ABSTAIN_LABEL, ["chest pain"])
            try:
                json.loads(render(template, sample))
            except json.JSONDecodeError as exc:
                return f"looks like JSON but does not render to valid JSON ({exc.msg})"
    return None


def provenance(model_provenance: dict[str, str], results: list[Classification]) -> str:
    """The journal's record of what produced these answers: hashes and counts, never text."""
    return json.dumps({**model_provenance, "abstained": sum(c.abstained for c in results),
                       "red_flag": sum(1 for c in results if c.red_flags)}, separators=(",", ":"))


class TriageWorkload:
    def __init__(self, local: LocalModels) -> None:
        self.local = local

    async def classify(self, model_id: str, texts: list[str], answer: LocalAnswer, receive: Receive | None) -> Classified:
        return await self.local.call(self.local.client.classify(model_id, texts, answer.priority), receive)

    def _provenance(self, model_id: str, results: list[Classification]) -> str:
        entry = self.local.registry.get(model_id)
        return provenance(entry.engine.provenance if entry is not None and entry.engine else {}, results)

    async def api(self, req: TriageRequest, model_id: str, receive: Receive | None, answer: LocalAnswer,
                  headers: dict[str, str], done: Done) -> Response:
        out = await self.classify(model_id, req.inputs(), answer, receive)
        done(200, out.tokens, None, provenance=self._provenance(model_id, out.results))
        body = {"object": "list", "model": model_id, "data": [c.as_dict(i) for i, c in enumerate(out.results)],
                "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens}, "understudy": answer.marker()}
        return JSONResponse(body, headers=headers)

    async def chat(self, req: ChatCompletionRequest, model_id: str, template: str, rid: str, receive: Receive | None,
                   answer: LocalAnswer, headers: dict[str, str], done: Done) -> Response:
        text = last_user_text(req, "A classifier")
        out = await self.classify(model_id, [text], answer, receive)
        content = render(template, out.results[0])
        use = fmt.usage(out.tokens, 0)
        done(200, out.tokens, 0, provenance=self._provenance(model_id, out.results))
        if not req.stream:
            body = fmt.completion_body(True, rid, model_id, content, "stop", use)
            body["understudy"] = answer.marker()
            return JSONResponse(body, headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = fmt.ChunkWriter(rid, model_id, True, include_usage, answer.marker())
        payload = writer.first() + writer.text(content) + writer.finish("stop")
        if include_usage:
            payload += writer.usage(use)

        async def body_iter() -> Any:
            yield payload + fmt.DONE

        return SseResponse(body_iter(), headers={**SSE_HEADERS, **headers})
