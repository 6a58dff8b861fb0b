"""OpenAI request schemas and the rule for parameters this server does not implement.

``parse_request(Model, body)`` (event-loop thread, every endpoint) turns a decoded JSON body into
a validated pydantic model or raises an ``InvalidRequest`` in OpenAI's shape, never echoing the
request's content back:

- a parameter OpenAI defines that we do not implement is accepted only at its neutral value
  (``n: 1``, ``logprobs: false``, ``tools: []``...); any other value is a 400 naming it;
- a parameter OpenAI does not define is a 400 ("Unrecognized request argument supplied");
- identifiers that change nothing (``user``, ``safety_identifier``, ``prompt_cache_key``) are
  accepted and ignored;
- ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted as extensions (llama.cpp's and
  vLLM's names), because the sampler implements them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidRequest, UnsupportedParameter


def _encodable(text: str) -> str:
    """JSON can carry unpaired UTF-16 surrogates (``"\\ud800"``); no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains an unpaired surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


def _none(v: Any) -> bool:
    return v is None


def _false(v: Any) -> bool:
    return v is None or v is False


def _one(v: Any) -> bool:
    return v is None or v == 1


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# parameter -> (is the value neutral?, why it is not supported)
_CHAT_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (_one, "Only n=1 is supported."),
    "logprobs": (_false, "Log probabilities are not returned."),
    "top_logprobs": (_none, "Log probabilities are not returned."),
    "tools": (_empty, "Tool calling is not supported."),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "Tool calling is not supported."),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "Tool calling is not supported."),
    "functions": (_empty, "Function calling is not supported."),
    "function_call": (lambda v: v in (None, "none", "auto"), "Function calling is not supported."),
    "logit_bias": (_empty, "logit_bias is not supported."),
    "store": (_false, "Stored completions are not supported."),
    "metadata": (_empty, "Stored completions are not supported."),
    "service_tier": (lambda v: v in (None, "auto", "default"), "Service tiers are not supported."),
    "reasoning_effort": (_none, "Reasoning models are not served locally."),
    "modalities": (lambda v: v is None or v == ["text"], "Only text output is supported."),
    "audio": (_none, "Audio output is not supported."),
    "prediction": (_none, "Predicted outputs are not supported."),
    "web_search_options": (_none, "Web search is not supported."),
    "verbosity": (_none, "verbosity is not supported."),
}
_COMPLETION_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (_one, "Only n=1 is supported."),
    "best_of": (_one, "Only best_of=1 is supported."),
    "echo": (_false, "echo is not supported."),
    "logprobs": (_false, "Log probabilities are not returned."),
    "suffix": (_none, "suffix (insertion) is not supported."),
    "logit_bias": (_empty, "logit_bias is not supported."),
}
_EMBEDDING_UNSUPPORTED: dict[str, tuple[Any, str]] = {}
_IGNORED = {"user", "safety_identifier", "prompt_cache_key"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ContentPart(_Strict):
    type: str
    text: Text | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError("content parts other than type 'text' (images, audio, files) are not supported")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None
    """Given to the model's chat template as ``name`` (a template may use it or not)."""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (enforced with a grammar)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def model_post_init(self, _: Any) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only one prompt per request is supported (a string or a list of one string)")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def completion_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1)
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be an empty list")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if any(not s for s in items):
            raise ValueError("inputs must not be empty strings")
        return v

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


_UNSUPPORTED: dict[type, dict[str, tuple[Any, str]]] = {
    ChatCompletionRequest: _CHAT_UNSUPPORTED,
    CompletionRequest: _COMPLETION_UNSUPPORTED,
    EmbeddingRequest: _EMBEDDING_UNSUPPORTED,
}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: Any) -> bool:
    """pydantic names the branch of a union in ``loc`` ('str', 'list[ContentPart]'); it is not a parameter."""
    text = str(part)
    return "[" in text or text.startswith("function-") or text.lower() in _TYPE_TAGS


def _describe(error: dict[str, Any]) -> tuple[str, str, str]:
    """(param, message, code) for one pydantic error; the message never contains the input."""
    loc = ".".join(str(p) for p in error.get("loc", ()) if not _is_union_tag(p))
    msg = error.get("msg", "invalid value")
    if error.get("type") == "missing":
        return loc, f"Missing required parameter: '{loc}'.", "missing_required_parameter"
    if error.get("type") == "extra_forbidden":
        return loc, f"Unrecognized request argument supplied: {loc}", "unknown_parameter"
    return loc, f"Invalid value for '{loc}': {msg}.", "invalid_value"


def parse_request(model: type[_Strict], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unsupported = _UNSUPPORTED.get(model, {})
    clean: dict[str, Any] = {}
    for key, value in body.items():
        if key in _IGNORED:
            continue
        rule = unsupported.get(key)
        if rule is not None:
            neutral, why = rule
            if not neutral(value):
                raise UnsupportedParameter(key, why)
            continue
        clean[key] = value
    try:
        return model.model_validate(clean)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        # A str | list union reports one error per branch; the most specific one is the last.
        # Missing and unknown parameters are the clearest to report, then our own validators'
        # findings (a branch whose type matched but whose value did not).
        first = errors[-1] if errors else {}
        for kind in ("missing", "extra_forbidden", "value_error"):
            first = next((e for e in errors if e.get("type") == kind), first)
            if first.get("type") == kind:
                break
        param, message, code = _describe(first)
        raise InvalidRequest(message, param=param or None, code=code) from None
