"""Properties (hypothesis) of request validation, the rate limiter, config merging, and the
deployment files.

- Validation, in-process, as ``server.app``'s ``dispatch`` does it: ``read_json`` (size, UTF-8,
  JSON, ``check_json_shape``), then ``check_key_caps``, then ``parse_request`` with each
  endpoint's pydantic schema. Whatever the body (negative, huge, NaN/Infinity, wrong types,
  invalid UTF-8, deep JSON), the outcome is a validated request or a 4xx in OpenAI's shape, never
  another exception; a 400's message never quotes the request's text.
- The same over HTTP against the shared test server: hostile bytes are a 4xx in OpenAI's shape.
- ``RateLimiter`` with an injected clock: never more than ``burst + rate x elapsed`` admitted;
  a refusal's Retry-After is positive and waiting it is enough.
- ``merge_tables``: merging a table with itself changes nothing; a conflicting leaf raises.
- The outage drill's body: a drill that starts has a finite duration within ``max_drill_s``.
- ``deploy/understudy.service`` and ``Dockerfile``: what a user relies on (unprivileged, state dir
  only writable, no core dumps, stop timeout past the drain, health check...).

Each bug these properties found (a schema that crashed the grammar parser, a key cap that a float,
a string or an absent ``max_tokens`` bypassed, a 500 on an integer of 5000 digits, a NaN drill that
never ended, a 400 quoting a content part's type) has its test here.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.requests import Request  # noqa: E402

from server.app import MAX_BODY_BYTES, read_json  # noqa: E402
from server.breaker import BreakerConfig, CircuitBreaker  # noqa: E402
from server.config import ConfigError, ServerConfig, merge_tables  # noqa: E402
from server.drill import DrillManager  # noqa: E402
from server.errors import ApiError, InvalidRequest, Overloaded  # noqa: E402
from server.keys import Key  # noqa: E402
from server.limits import MAX_JSON_DEPTH, RateLimiter, check_key_caps  # noqa: E402
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request  # noqa: E402
from server.workloads.summaries import SummarizeRequest  # noqa: E402
from server.workloads.triage import TriageRequest  # noqa: E402
from tests.conftest import CHAT_MODEL, EMBED_MODEL, ROOT, ServerProc  # noqa: E402

FAST = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CAP = 16

# -- values ---------------------------------------------------------------------------------------
HOSTILE_NUMBERS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40), st.floats(),  # NaN and +-Infinity included
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**300, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.5, 16.0, 17.0]),
)
HOSTILE_STRINGS = st.one_of(
    st.text(max_size=20), st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "NaN", "Infinity", "-1", "16", "1e3", "\u202e"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBERS, HOSTILE_STRINGS)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)

SCHEMAS = {
    "chat": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest,
    "triage": TriageRequest, "summarize": SummarizeRequest,
}
VALID = {
    "chat": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "fever and cough"}], "max_tokens": 8},
    "completions": {"model": CHAT_MODEL, "prompt": "fever and cough", "max_tokens": 8},
    "embeddings": {"model": EMBED_MODEL, "input": ["fever and cough"]},
    "triage": {"input": "fever and cough"},
    "summarize": {"input": "The patient has a fever. She was given paracetamol.", "max_words": 8},
}
#: Every parameter each schema knows, plus parameters OpenAI defines that are accepted at a
#: neutral value only, plus ones nobody defines.
FIELDS = {name: sorted(set(model.model_fields) | {"n", "logprobs", "tools", "user", "frobnicate"})
          for name, model in SCHEMAS.items()}
FLOAT_BOUNDS = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "repetition_penalty": (0, 10),
                "frequency_penalty": (-2, 2), "presence_penalty": (-2, 2)}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _read(raw: bytes, content_length: int | None = None) -> tuple[bytes, Any]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    length = len(raw) if content_length is None else content_length
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]}
    return await read_json(Request(scope, receive))


def assert_openai_shape(exc: ApiError) -> None:
    body = exc.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert 400 <= exc.status < 500, exc.status
    assert all(isinstance(v, str) for v in exc.headers().values())
    json.dumps(body, allow_nan=False)  # renderable as strict JSON


def dispatch(endpoint: str, raw: bytes, key: Key | None = None) -> Any:
    """What ``server.app``'s ``dispatch`` does before routing; returns the validated request."""
    _, body = _run(_read(raw))
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    check_key_caps(key, body)
    return parse_request(SCHEMAS[endpoint], body)


def outcome(endpoint: str, raw: bytes, key: Key | None = None) -> Any:
    """The validated request, or the ``ApiError`` (checked to be a 4xx in OpenAI's shape)."""
    try:
        return dispatch(endpoint, raw, key)
    except ApiError as exc:
        assert_openai_shape(exc)
        return exc


def assert_sane(req: Any) -> None:
    """A request that passed validation carries only values the engines can take."""
    for name, (low, high) in FLOAT_BOUNDS.items():
        value = getattr(req, name, None)
        if value is not None:
            assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, (name, value)
    for name in ("max_tokens", "max_completion_tokens", "max_words", "dimensions"):
        value = getattr(req, name, None)
        if value is not None:
            assert type(value) is int and value >= 1, (name, value)
    for name in ("top_k", "seed"):
        value = getattr(req, name, None)
        assert value is None or type(value) is int, (name, value)


def encode(body: Any) -> bytes:
    """JSON as Python writes it: NaN and Infinity as bare literals, lone surrogates escaped."""
    return json.dumps(body).encode()


# -- validation, in-process -----------------------------------------------------------------------
@FAST
@given(endpoint=st.sampled_from(sorted(SCHEMAS)), data=st.data())
def test_one_hostile_field_is_a_valid_request_or_a_400(endpoint: str, data: st.DataObject) -> None:
    body = dict(VALID[endpoint])
    name = data.draw(st.sampled_from(FIELDS[endpoint]), label="field")
    body[name] = data.draw(JSON_VALUES, label="value")
    result = outcome(endpoint, encode(body))
    if not isinstance(result, ApiError):
        assert_sane(result)


@FAST
@given(endpoint=st.sampled_from(sorted(SCHEMAS)), body=JSON_VALUES)
def test_any_json_is_a_valid_request_or_a_400(endpoint: str, body: Any) -> None:
    result = outcome(endpoint, encode(body))
    if not isinstance(result, ApiError):
        assert_sane(result)


@FAST
@given(endpoint=st.sampled_from(sorted(SCHEMAS)), raw=st.binary(max_size=300))
@example(endpoint="chat", raw=b"\xff\xfe{}")
@example(endpoint="chat", raw=b'{"model": "\xc3\x28"}')
@example(endpoint="chat", raw=b"\xef\xbb\xbf{}")
@example(endpoint="embeddings", raw=b"")
def test_any_bytes_are_a_valid_request_or_a_400(endpoint: str, raw: bytes) -> None:
    outcome(endpoint, raw)


@FAST
@given(endpoint=st.sampled_from(sorted(SCHEMAS)), data=st.data())
def test_invalid_utf8_inside_a_valid_body_is_a_400(endpoint: str, data: st.DataObject) -> None:
    raw = encode(VALID[endpoint])
    at = data.draw(st.integers(0, len(raw)), label="at")
    bad = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]), label="bytes")
    result = outcome(endpoint, raw[:at] + bad + raw[at:])
    assert isinstance(result, ApiError) and result.status == 400


@settings(max_examples=60, deadline=None, database=None)
@given(depth=st.integers(1, 3000), kind=st.sampled_from(["list", "object", "mixed"]))
@example(depth=100_000, kind="list")
@example(depth=MAX_JSON_DEPTH, kind="list")
@example(depth=MAX_JSON_DEPTH + 1, kind="object")
def test_deep_json_is_refused_past_the_limit_never_a_crash(depth: int, kind: str) -> None:
    opens = {"list": "[", "object": '{"a":', "mixed": '[{"a":'}[kind]
    closes = {"list": "]", "object": "}", "mixed": "}]"}[kind]
    levels = depth if kind != "mixed" else max(1, depth // 2)
    raw = ('{"model": "m", "input": ' + opens * levels + "1" + closes * levels + "}").encode()
    result = outcome("embeddings", raw)
    containers = 1 + levels * (2 if kind == "mixed" else 1)  # the body itself is the first
    refused = isinstance(result, ApiError) and result.code == "invalid_json"
    assert refused == (containers > MAX_JSON_DEPTH), (containers, result)


def test_a_body_over_the_limit_is_413() -> None:
    with pytest.raises(ApiError) as caught:
        _run(_read(b"{}", content_length=MAX_BODY_BYTES + 1))
    assert caught.value.status == 413 and caught.value.code == "request_too_large"


@FAST
@given(endpoint=st.sampled_from(["chat", "completions"]), name=st.sampled_from(sorted(FLOAT_BOUNDS)),
       literal=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]))
def test_nan_and_infinity_literals_are_400(endpoint: str, name: str, literal: str) -> None:
    raw = encode(VALID[endpoint])[:-1] + f', "{name}": {literal}}}'.encode()
    result = outcome(endpoint, raw)
    assert isinstance(result, ApiError) and result.status == 400 and result.param == name


MARKER = st.text(alphabet="bcdfghjklmnpqrstvwxz", min_size=10, max_size=16).map(lambda s: "Zq" + s)


def _text_slots(endpoint: str, marker: str) -> list[dict[str, Any]]:
    """Bodies that carry ``marker`` as text the client wrote (message content, a prompt, an
    input, a stop string...), at valid and at invalid places."""
    bad = marker + "\ud800"  # an unpaired surrogate: the text itself is invalid
    base = VALID[endpoint]
    if endpoint == "chat":
        msgs = lambda content, **kw: {**base, "messages": [{"role": "user", "content": content, **kw}]}  # noqa: E731
        return [msgs(bad), msgs([{"type": "text", "text": bad}]), msgs("x", name=bad), msgs("x", role=marker),
                {**base, "messages": [{"role": marker, "content": marker}]}, {**base, "stop": [bad]},
                {**base, "stop": [marker] * 5}, {**base, "temperature": marker}, {**base, "seed": marker},
                {**base, "response_format": {"type": marker}}, {**base, "messages": marker}, {**base, "n": marker},
                {**base, "tool_choice": marker}, {**base, "user": [marker]}]
    field = "prompt" if endpoint == "completions" else "input"
    out = [{**base, field: bad}, {**base, field: [bad]}, {**base, field: [marker, bad]}, {**base, field: {"text": marker}},
           {**base, "model": [marker]}, {**base, field: [marker] * 300}]
    if endpoint == "embeddings":
        out.append({**base, "encoding_format": marker})
    if endpoint == "summarize":
        out += [{**base, "method": marker}, {**base, "max_words": marker}]
    if endpoint in ("chat", "completions"):
        out.append({**base, "stop": [bad]})
    return out


@FAST
@given(endpoint=st.sampled_from(sorted(SCHEMAS)), marker=MARKER, data=st.data())
def test_a_400_never_quotes_the_requests_text(endpoint: str, marker: str, data: st.DataObject) -> None:
    body = data.draw(st.sampled_from(_text_slots(endpoint, marker)), label="body")
    result = outcome(endpoint, encode(body))
    if isinstance(result, ApiError):
        assert marker not in result.message, result.message


def test_a_content_parts_type_is_not_quoted() -> None:
    body = {**VALID["chat"], "messages": [{"role": "user", "content": [{"type": "Patient Jane Roe, DOB 1950-01-01"}]}]}
    result = outcome("chat", encode(body))
    assert isinstance(result, ApiError) and "Jane Roe" not in result.message, result.message


# -- a key's token caps -----------------------------------------------------------------------------
CAPPED = Key("capped", "client", b"capped-key-0123456789", max_tokens=CAP)


@FAST
@given(endpoint=st.sampled_from(["chat", "completions"]), name=st.sampled_from(["max_tokens", "max_completion_tokens"]),
       asked=st.integers(-5, 10**6))
def test_an_integer_over_a_keys_cap_is_refused_and_within_it_allowed(endpoint: str, name: str, asked: int) -> None:
    assume(endpoint == "chat" or name == "max_tokens")
    result = outcome(endpoint, encode({**VALID[endpoint], name: asked}), CAPPED)
    if asked > CAP:
        assert isinstance(result, ApiError) and result.code == "key_limit_exceeded" and result.param == name
    elif asked >= 1:
        assert not isinstance(result, ApiError) and result.completion_limit() == asked
    else:
        assert isinstance(result, ApiError) and result.code == "invalid_value"


@pytest.mark.parametrize(("endpoint", "change"), [
    ("chat", {"max_tokens": None}),            # absent: the whole context (4058 tokens measured)
    ("chat", {"max_tokens": 100.0}),           # a float: 85 tokens measured with a cap of 16
    ("chat", {"max_tokens": "100"}),           # a string: pydantic's lax mode reads it as 100
    ("chat", {"max_tokens": None, "max_completion_tokens": 1e3}),
    ("completions", {"max_tokens": None}),     # null: no limit at all (OpenAI's default is 16)
], ids=["chat-absent", "chat-float", "chat-string", "chat-max-completion-float", "completions-null"])
def test_a_keys_cap_bounds_every_request(endpoint: str, change: dict[str, Any]) -> None:
    body = {**VALID[endpoint], **change}
    if endpoint == "chat" and change.get("max_tokens", 0) is None:
        del body["max_tokens"]
    result = outcome(endpoint, encode(body), CAPPED)
    if not isinstance(result, ApiError):
        limit = result.completion_limit()
        assert limit is not None and limit <= CAP, limit


# -- the outage drill's body ----------------------------------------------------------------------
def _drills(tmp: Path, max_s: float = 30.0) -> DrillManager:
    breaker = CircuitBreaker("cloud", BreakerConfig(), clock=lambda: 0.0)
    upstreams = SimpleNamespace(by_name={"cloud": SimpleNamespace(breaker=breaker)})
    return DrillManager(upstreams, {}, None, SimpleNamespace(entries=[]), tmp, max_s, set())  # type: ignore[arg-type]


async def _start(tmp: Path, body: Any) -> Any:
    drills = _drills(tmp)
    try:
        return drills.start(body)
    except ApiError as exc:
        return exc
    finally:
        for task in (drills._timer, drills._sampler):
            if task is not None:
                task.cancel()


@FAST
@given(body=st.one_of(JSON_VALUES, st.fixed_dictionaries({"duration_s": JSON_VALUES}, optional={
    "upstreams": st.one_of(JSON_VALUES, st.lists(st.sampled_from(["cloud", "other"]), max_size=3)),
    "workloads": JSON_VALUES})))
def test_a_drill_that_starts_is_finite_and_within_max_drill_s(tmp_path_factory: pytest.TempPathFactory, body: Any) -> None:
    assume(not (isinstance(body, dict) and isinstance(body.get("duration_s"), float) and math.isnan(body["duration_s"])))
    result = _run(_start(tmp_path_factory.getbasetemp(), body))
    if isinstance(result, ApiError):
        assert_openai_shape(result)
    else:
        assert math.isfinite(result.duration_s) and 0 < result.duration_s <= 30.0
        json.dumps(result.describe(0.0), allow_nan=False)


def test_a_nan_drill_is_refused(tmp_path: Path) -> None:
    _, body = _run(_read(b'{"duration_s": NaN}'))
    result = _run(_start(tmp_path, body))
    assert isinstance(result, ApiError) and result.status == 400


# -- JSON numbers Python cannot read ----------------------------------------------------------------
def test_an_integer_too_long_for_python_is_a_400() -> None:
    result = outcome("chat", b'{"model": ' + b"1" * 5000 + b"}")
    assert isinstance(result, ApiError) and result.status == 400


# -- a JSON schema for local generation ----------------------------------------------------------------
GRAMMAR_CHECK = """
import json, sys
from types import SimpleNamespace
from models.catalog import default_catalog
from models.llama_runner import LlamaModel
from server.errors import InvalidRequest
from server.local import response_grammar
from server.schemas import ChatCompletionRequest, parse_request
entry = SimpleNamespace(llm=LlamaModel(default_catalog()[0].path, vocab_only=True))
req = parse_request(ChatCompletionRequest, json.loads(sys.argv[1]))
try:
    response_grammar(req, entry)
    print("accepted")
except InvalidRequest as exc:
    print("refused", exc.status)
"""


def grammar_outcome(schema: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``response_grammar`` (what a chat request with this ``response_format`` schema goes
    through on the server's event-loop thread), in a child process: it may crash."""
    body = {**VALID["chat"], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    return subprocess.run([sys.executable, "-c", GRAMMAR_CHECK, json.dumps(body)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_json_schema_grammar_is_checked_without_crashing() -> None:
    done = grammar_outcome({"type": "object", "properties": {"label": {"type": "string", "maxLength": 64}}})
    assert done.returncode == 0 and done.stdout.split() == ["accepted"], (done.returncode, done.stdout, done.stderr[-500:])


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 100_000},
                                    {"type": "array", "items": {"type": "integer"}, "maxItems": 20_000}],
                         ids=["maxLength", "maxItems"])
def test_a_huge_repetition_in_a_json_schema_is_a_400_not_a_crash(schema: dict[str, Any]) -> None:
    done = grammar_outcome(schema)
    assert done.returncode == 0, f"the process died with status {done.returncode}"
    assert done.stdout.split() == ["refused", "400"], done.stdout


# -- over HTTP, against the shared test server -------------------------------------------------------
FAST_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings",
              "triage": "/v1/triage", "summarize": "/v1/summarize"}


def _hostile_bytes(endpoint: str) -> st.SearchStrategy[bytes]:
    valid = encode(VALID[endpoint])
    field = st.sampled_from(sorted(FLOAT_BOUNDS) if endpoint in ("chat", "completions") else ["input", "model", "max_words"])
    literal = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"[" * 40 + b"]" * 40, b'"\xff\xfe"', b'"\\ud800"'])
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda at, junk: valid[:at] + junk + valid[at:], st.integers(0, len(valid)), st.binary(min_size=1, max_size=4)),
        st.builds(lambda name, lit: valid[:-1] + b', "' + name.encode() + b'": ' + lit + b"}", field, literal),
        st.sampled_from([b"[]", b"null", b"1", b'"x"', b"\xef\xbb\xbf{}", b"[" * 100_000 + b"]" * 100_000]),
    )


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
@pytest.mark.parametrize("endpoint", sorted(FAST_PATHS))
def test_hostile_bytes_over_http_are_a_4xx_in_openais_shape(server: ServerProc, endpoint: str, data: st.DataObject) -> None:
    raw = data.draw(_hostile_bytes(endpoint), label="body")
    r = httpx.post(server.url + FAST_PATHS[endpoint], content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    if r.status_code == 200:  # the junk left a valid request (a few bytes of whitespace...): it is a real answer
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


# -- the rate limiter ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RPM = st.floats(min_value=0.1, max_value=100_000, allow_nan=False)
BURST = st.one_of(st.none(), st.integers(1, 500))
GAPS = st.lists(st.one_of(st.just(0.0), st.floats(min_value=0, max_value=120, allow_nan=False)), min_size=1, max_size=300)


@FAST
@given(rpm=RPM, burst=BURST, gaps=GAPS)
def test_the_limiter_never_admits_more_than_burst_plus_rate_times_elapsed(rpm: float, burst: int | None, gaps: list[float]) -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    key = Key("k", "client", b"k" * 16, rpm=rpm, burst=burst)
    capacity = float(burst or max(1, int(rpm // 10)))
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap
        wait = limiter.take(key)
        if wait is None:
            admitted.append(clock.now)
        else:
            assert math.isfinite(wait) and wait > 0
    # any window [admitted[i], admitted[j]] holds at most burst + rate x its length
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= capacity + (admitted[j] - admitted[i]) * rpm / 60 + 1e-6


@FAST
@given(rpm=RPM, burst=BURST, extra=st.integers(1, 50))
def test_a_refusal_says_when_to_come_back_and_that_is_enough(rpm: float, burst: int | None, extra: int) -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    key = Key("k", "client", b"k" * 16, rpm=rpm, burst=burst)
    capacity = burst or max(1, int(rpm // 10))
    for _ in range(capacity):
        assert limiter.take(key) is None  # a fresh key gets its whole burst at once
    for _ in range(extra):
        with pytest.raises(Overloaded) as refused:
            limiter.check(key)
        assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
        retry_after = refused.value.headers()["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) >= 1
        wait = limiter.take(key)
        assert wait is not None and wait > 0
        clock.now += wait * (1 + 1e-9) + 1e-9
        assert limiter.take(key) is None


@FAST
@given(gaps=GAPS)
def test_a_key_without_a_rate_is_never_limited(gaps: list[float]) -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    key = Key("k", "client", b"k" * 16)
    for gap in gaps:
        clock.now += gap
        assert limiter.take(key) is None


# -- merge_tables ----------------------------------------------------------------------------------
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(lambda k: k not in ("upstreams", "workloads"))
TOML_LEAVES = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
                        st.lists(st.integers(), max_size=3))  # TOML's nan is left out: nan != nan (see the report)
TABLES = st.recursive(st.dictionaries(KEYS, TOML_LEAVES, max_size=4),
                      lambda inner: st.dictionaries(KEYS, st.one_of(TOML_LEAVES, inner), max_size=4), max_leaves=16)


def _leaves(table: dict[str, Any], where: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in table.items():
        out += _leaves(value, where + (key,)) if isinstance(value, dict) else [where + (key,)]
    return out


@FAST
@given(table=TABLES)
def test_merging_a_table_with_itself_changes_nothing(table: dict[str, Any]) -> None:
    before = copy.deepcopy(table)
    assert merge_tables(table, copy.deepcopy(table), "a.toml", "b.toml") == table
    assert table == before  # the inputs are left alone


@FAST
@given(a=TABLES, b=TABLES)
def test_merging_is_a_union_or_a_conflict(a: dict[str, Any], b: dict[str, Any]) -> None:
    try:
        merged = merge_tables(a, b, "a.toml", "b.toml")
    except ConfigError as exc:
        assert "a.toml" in str(exc) and "b.toml" in str(exc)
        return
    assert set(_leaves(merged)) == set(_leaves(a)) | set(_leaves(b))
    for source in (a, b):
        for path in _leaves(source):
            assert _get(merged, path) == _get(source, path)
    assert merged == merge_tables(b, a, "b.toml", "a.toml")  # without arrays of tables, the order does not matter


def _get(table: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        table = table[key]
    return table


@FAST
@given(table=TABLES.filter(lambda t: bool(_leaves(t))), data=st.data())
def test_a_conflicting_leaf_raises_naming_the_key_and_both_files(table: dict[str, Any], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_leaves(table)), label="leaf")
    other = copy.deepcopy(table)
    parent = other
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    new = data.draw(TOML_LEAVES.filter(lambda v: v != old and not isinstance(v, dict)), label="new value")
    parent[path[-1]] = new
    with pytest.raises(ConfigError) as conflict:
        merge_tables(table, other, "base.toml", "tuned.toml")
    assert conflict.value.key == ".".join(path)
    assert "base.toml" in str(conflict.value) and "tuned.toml" in str(conflict.value)


@FAST
@given(a=st.lists(st.dictionaries(KEYS, TOML_LEAVES, max_size=2), max_size=3),
       b=st.lists(st.dictionaries(KEYS, TOML_LEAVES, max_size=2), max_size=3))
def test_arrays_of_tables_are_appended(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    merged = merge_tables({"upstreams": a, "workloads": b}, {"upstreams": b, "workloads": a}, "a", "b")
    assert merged == {"upstreams": a + b, "workloads": b + a}


# -- deployment files ------------------------------------------------------------------------------
UNIT = ROOT / "deploy" / "understudy.service"
DOCKERFILE = ROOT / "Dockerfile"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        name, _, value = line.partition("=")
        current.setdefault(name.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", value):
        total += float(number) * {"": 1, "s": 1, "ms": 0.001, "min": 60, "h": 3600}[unit]
    return total


def test_the_systemd_unit_runs_unprivileged_with_only_its_state_dir_writable() -> None:
    service = unit_settings()["Service"]
    one = {name: values[-1] for name, values in service.items()}
    assert one["User"] == "understudy" and one.get("Group", "understudy") == "understudy"
    command = shlex.split(one["ExecStart"])
    assert command[0].endswith("understudy") and command[1] == "serve"
    assert command[command.index("--config") + 1] == "/etc/understudy/understudy.toml"
    assert one["ReadWritePaths"].split() == ["/var/lib/understudy"]
    assert one["LimitCORE"] == "0"  # a core dump would hold patient text
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP re-reads the key file
    assert one["EnvironmentFile"] == "/etc/understudy/keys.env"
    for name, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                        "PrivateDevices": "yes"}.items():
        assert one.get(name) == value, name
    defaults = ServerConfig()
    assert _seconds(one["TimeoutStopSec"]) > defaults.drain_grace_s + defaults.drain_timeout_s


def dockerfile_stages() -> list[dict[str, Any]]:
    """Instructions per stage (line continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append({"FROM": rest.strip(), "lines": []})
        elif stages:
            stages[-1]["lines"].append((word, rest.strip()))
        else:
            assert word == "ARG", f"only ARG may come before the first FROM, not {word}"
    return stages


def test_the_dockerfile_builds_llama_in_one_stage_and_runs_unprivileged_in_another() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    build_text = " ".join(rest for _, rest in build["lines"])
    assert "scripts/llama_cmake_args.py" in build_text and "CMAKE_ARGS" in build_text
    pinned = re.search(r'"llama-cpp-python==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and pinned.group(1) in DOCKERFILE.read_text(), "the Dockerfile builds another llama-cpp-python"
    words = [word for word, _ in runtime["lines"]]
    users = [rest for word, rest in runtime["lines"] if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") < max(i for i, w in enumerate(words) if w in ("CMD", "ENTRYPOINT"))
    health = " ".join(rest for word, rest in runtime["lines"] if word == "HEALTHCHECK")
    assert "/health" in health
    assert ("STOPSIGNAL", "SIGTERM") in runtime["lines"]
    assert any(word == "EXPOSE" and "8080" in rest.split() for word, rest in runtime["lines"])
    start = " ".join(rest for word, rest in runtime["lines"] if word in ("CMD", "ENTRYPOINT"))
    assert "0.0.0.0" in start and "serve" in start
    assert "UNDERSTUDY_API_KEYS" in DOCKERFILE.read_text()  # documented: a public bind needs keys


def test_the_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for path in (".venv", ".git", ".understudy", ".cache", "*.env"):
        assert path in ignored or f"**/{path}" in ignored, path
