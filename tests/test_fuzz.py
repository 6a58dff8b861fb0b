"""Fuzzing the HTTP API with schemathesis, against a real server with keys configured.

The schema is the server's own ``/openapi.json`` (fetched with the admin key): FastAPI's routes
plus the generation endpoints with the pydantic request schemas the router validates with
(``server.app.openapi_with_fast_paths``). For every operation, schemathesis generates valid and
invalid requests (hypothesis, ``UNDERSTUDY_FUZZ_EXAMPLES`` examples per operation, 200 by
default: under a minute on 2 idle cores; ``make fuzz`` (``scripts/fuzz.py``) raises it
for a long run), and each one is sent:

- without a key, and with a wrong key: 401 ``invalid_api_key`` on every route but ``/health``
  and ``/ready``;
- with a client key on an ``/admin`` route: 403 ``insufficient_permissions`` (an admin key is
  configured);
- with the right key (admin for ``/admin``, a client key elsewhere): never a 5xx, and every
  error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

So that valid requests reach the engines rather than stopping at the 404 of a random model name:
half of them name a real model (or workload), and ``tighten`` adds to the schema the rules the
server's validators enforce but its JSON schema does not say (content parts are ``text``, at
most 4 non-empty stop strings, one prompt, non-blank inputs...); invalid requests are generated
against those rules too.

Generation stays short (SmolLM2 on 2 cores writes about 100 tokens a second): the client key
comes from a key file with ``max_tokens=16``, and ``bounded`` gives a request that sets no
limit ``max_tokens: 16`` and summaries at most 8 words. The drill POST cannot start a drill
(this server is purely local: there is no upstream to take down); ``max_drill_s`` is 2 s besides.

``UNDERSTUDY_FUZZ_SEED`` fixes hypothesis' seed (to replay a run); by default every run explores
new inputs. ``UNDERSTUDY_FUZZ_REPORT`` names a JSON file that gets, per operation, how many
answers of each status and error code the right key got.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server.limits import lax_number  # noqa: E402
from tests.conftest import CHAT_MODEL, EMBED_MODEL, ServerProc, run_server  # noqa: E402

EXAMPLES = int(os.environ.get("UNDERSTUDY_FUZZ_EXAMPLES", "200"))
SEED = os.environ.get("UNDERSTUDY_FUZZ_SEED")
REPORT = os.environ.get("UNDERSTUDY_FUZZ_REPORT")
REQUEST_TIMEOUT_S = 60.0

ENV_CLIENT_KEY = "fuzz-env-client-key-0123456789"
CAPPED_KEY = "fuzz-capped-client-key-0123456789"
ADMIN_KEY = "fuzz-admin-key-0123456789abcdef"
METRICS_KEY = "fuzz-metrics-key-0123456789abcdef"
WRONG_KEY = "fuzz-wrong-key-0123456789abcdef"
MAX_TOKENS = 16
MAX_WORDS = 8

OPEN_PATHS = {"/health", "/ready"}
#: What a real request names, per operation (the generated name is kept half the time).
REAL_MODELS = {
    "/v1/chat/completions": [CHAT_MODEL, "triage", "summaries"],
    "/v1/completions": [CHAT_MODEL],
    "/v1/embeddings": [EMBED_MODEL],
    "/v1/triage": ["triage", "triage-minilm"],
    "/v1/summarize": ["summaries", CHAT_MODEL],
}
MODEL_IDS = [CHAT_MODEL, EMBED_MODEL, "triage-minilm", "triage", "summaries"]

#: Every operation of ``/openapi.json``; ``test_schema_operations`` keeps the list in step with the
#: server (a new route fails there until it is added here, and so fuzzed).
OPERATIONS = [
    ("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/triage"),
    ("POST", "/v1/summarize"),
    ("GET", "/admin/hardware"), ("GET", "/admin/status"), ("GET", "/admin/readiness"), ("GET", "/admin/events"),
    ("GET", "/admin/drill"), ("POST", "/admin/drill"), ("DELETE", "/admin/drill"),
]
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
STATS: dict[str, Counter[str]] = defaultdict(Counter)


def assert_openai_error(response: Any, what: str = "") -> None:
    """OpenAI's error shape: a JSON object with one ``error`` object holding exactly message,
    type, param and code (message and type non-empty strings, param and code strings or null)."""
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{what}{response.status_code} body is not JSON: {response.text[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}{response.status_code}: not {{'error': ...}}: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == OPENAI_ERROR_KEYS, f"{what}error keys {sorted(error)}: {body!r}"
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body


def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx and 5xx has OpenAI's error shape (``/ready``'s 503 is a
    status report, not an error)."""
    if response.status_code >= 400 and case.operation.path != "/ready":
        assert_openai_error(response)
    return None


# -- the server and its schema ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "keys.txt").write_text(f"fuzz-capped {CAPPED_KEY} max_tokens={MAX_TOKENS} max_prompt_tokens=4000\n")
    config = '[server]\nkey_file = "keys.txt"\nmax_drill_s = 2\n'
    env = {"UNDERSTUDY_API_KEYS": ENV_CLIENT_KEY, "UNDERSTUDY_ADMIN_KEY": ADMIN_KEY, "UNDERSTUDY_METRICS_KEY": METRICS_KEY}
    with run_server(tmp, config, env=env) as srv:
        yield srv
        log = srv.log()
    if REPORT:
        Path(REPORT).write_text(json.dumps({op: dict(sorted(c.items())) for op, c in sorted(STATS.items())}, indent=1) + "\n")
    assert "Traceback" not in log, f"the server logged a crash while it was fuzzed:\n{log[-4000:]}"


def _set(schemas: dict[str, Any], name: str, prop: str, value: dict[str, Any]) -> None:
    """Replace one property's schema (keeping its title and default), if the model still has it."""
    props = schemas.get(name, {}).get("properties", {})
    if prop in props:
        keep = {k: props[prop][k] for k in ("title", "default") if k in props[prop]}
        props[prop] = {**value, **keep}


def tighten(raw: dict[str, Any]) -> dict[str, Any]:
    """The schema plus the rules of the server's own validators (``field_validator`` and
    ``local.py`` checks that pydantic's JSON schema cannot show), so that generated "valid"
    requests are valid."""
    raw = copy.deepcopy(raw)
    s = raw.get("components", {}).get("schemas", {})
    text = {"type": "string", "minLength": 1}
    not_blank = {"type": "string", "pattern": r"\S"}
    stop = {"anyOf": [{"type": "string"}, {"type": "array", "items": text, "maxItems": 4}, {"type": "null"}]}
    _set(s, "ContentPart", "type", {"type": "string", "enum": ["text"]})
    _set(s, "ChatCompletionRequest", "stop", stop)
    _set(s, "CompletionRequest", "stop", stop)
    _set(s, "CompletionRequest", "prompt", {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]})
    _set(s, "EmbeddingRequest", "input", {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 2048}]})
    _set(s, "EmbeddingRequest", "dimensions", {"anyOf": [{"type": "integer", "enum": [384]}, {"type": "null"}]})
    _set(s, "TriageRequest", "input", {"anyOf": [not_blank, {"type": "array", "items": not_blank, "minItems": 1, "maxItems": 256}]})
    _set(s, "SummarizeRequest", "input", not_blank)
    return raw


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProc) -> Any:
    response = httpx.get(fuzz_server.url + "/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    config = schemathesis.Config.from_dict({
        "base-url": fuzz_server.url,
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {"mode": "all", "max-examples": EXAMPLES},
        **({"seed": int(SEED)} if SEED else {}),
    })
    return schemathesis.openapi.from_dict(tighten(response.json()), config=config)


# -- one example ----------------------------------------------------------------------------------
def bounded(case: Any, data: st.DataObject) -> None:
    """Name a real model half the time; keep the local model's generation short.

    A key's ``max_tokens`` cap is checked only on integers, and a chat request without
    ``max_tokens`` (or a completion with ``max_tokens: null``) may fill the model's context, so
    this gives those requests a limit itself (``tests/test_properties.py`` pins that bug:
    ``test_a_keys_cap_bounds_every_request``)."""
    path = case.operation.path
    if path == "/v1/models/{model_id}" and data.draw(st.booleans(), label="real model"):
        case.path_parameters = {**(case.path_parameters or {}), "model_id": data.draw(st.sampled_from(MODEL_IDS))}
        return
    body = case.body
    if path not in REAL_MODELS or not isinstance(body, dict):
        return
    body = dict(body)
    if "model" in body and data.draw(st.booleans(), label="real model"):
        body["model"] = data.draw(st.sampled_from(REAL_MODELS[path]), label="model")
    for name in ("max_tokens", "max_completion_tokens"):
        asked = lax_number(body.get(name))
        if asked is None or not (math.isnan(asked) or asked > MAX_TOKENS):
            continue
        if not isinstance(body[name], int):  # 100.0 and "100" pass the key's cap (a bug): never sent as such
            body[name] = MAX_TOKENS
        elif data.draw(st.booleans(), label=f"{name} within the key's cap"):  # else the cap's 400
            body[name] = data.draw(st.integers(1, MAX_TOKENS), label=name)
    if path == "/v1/chat/completions" and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if path == "/v1/completions" and "max_tokens" in body and body["max_tokens"] is None:
        body["max_tokens"] = MAX_TOKENS
    if path == "/v1/summarize":
        words = body.get("max_words")
        if words is None or (lax_number(words) or 0) > MAX_WORDS:
            body["max_words"] = MAX_WORDS
    if body != case.body:
        case.body = body  # reassigned, so that schemathesis re-validates the case (valid or not)


def check_case(case: Any, data: st.DataObject) -> None:
    path = case.operation.path
    bounded(case, data)
    for label, headers in (("no key", {}), ("wrong key", {"Authorization": f"Bearer {WRONG_KEY}"})):
        response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
        if path in OPEN_PATHS:
            assert response.status_code < 500 or path == "/ready", f"{label}: {response.status_code}"
            continue
        assert response.status_code == 401, f"{label} on {case.operation.label}: {response.status_code} {response.text[:300]}"
        assert_openai_error(response, f"{label}: ")
        assert response.json()["error"]["code"] == "invalid_api_key"
    if path.startswith("/admin"):
        response = case.call(headers={"Authorization": f"Bearer {CAPPED_KEY}"}, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 403, f"client key on {case.operation.label}: {response.status_code} {response.text[:300]}"
        assert_openai_error(response, "client key on admin: ")
        assert response.json()["error"]["code"] == "insufficient_permissions"
    key = ADMIN_KEY if path.startswith("/admin") else CAPPED_KEY
    response = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_S,
                                      checks=[not_a_server_error, openai_error_shape])
    code = response.json()["error"]["code"] if response.status_code >= 400 and path != "/ready" else None
    STATS[case.operation.label][f"{response.status_code} {code or ''}".strip()] += 1


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_api(api_schema: Any, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=REQUEST_TIMEOUT_S * 2), database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, data=st.data())
    def fuzz(case: Any, data: st.DataObject) -> None:
        check_case(case, data)

    if SEED:
        fuzz = seed(int(SEED))(fuzz)
    fuzz()


def test_schema_operations(api_schema: Any) -> None:
    """``/openapi.json`` lists exactly ``OPERATIONS`` (a new route is fuzzed once it is added
    there), the generation endpoints included, each with its request body."""
    paths = api_schema.raw_schema["paths"]
    assert {(m.upper(), p) for p, ops in paths.items() for m in ops} == set(OPERATIONS)
    for path in REAL_MODELS:
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True and "$ref" in body["content"]["application/json"]["schema"]


# -- routes the schema does not list --------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/admin"), ("GET", "/admin/nothing"), ("GET", "/v1/nothing"),
    ("POST", "/v1/models"), ("PUT", "/v1/chat/completions"), ("GET", "/v1/embeddings"),
])
def test_unlisted_routes_need_a_key(fuzz_server: ServerProc, method: str, path: str) -> None:
    """Routes outside the schema (hidden, unknown, wrong method) are behind the key too: 401
    without one; with any valid key never a 5xx, and errors in OpenAI's shape."""
    response = httpx.request(method, fuzz_server.url + path, timeout=10)
    assert response.status_code == 401, (path, response.status_code)
    assert_openai_error(response)
    for key in (CAPPED_KEY, ADMIN_KEY, METRICS_KEY):
        response = httpx.request(method, fuzz_server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code < 500, (path, response.status_code)
        if response.status_code >= 400:
            assert_openai_error(response)


def test_open_routes_need_no_key(fuzz_server: ServerProc) -> None:
    for path in ("/health", "/ready", "/dashboard"):
        assert httpx.get(fuzz_server.url + path, timeout=10).status_code == 200, path


def test_metrics_key_roles(fuzz_server: ServerProc) -> None:
    """``/metrics``: the metrics and admin keys read it; a client key is 403 (a metrics key is
    configured); the metrics key reads nothing else."""
    def get(path: str, key: str) -> httpx.Response:
        return httpx.get(fuzz_server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)

    assert get("/metrics", METRICS_KEY).status_code == 200
    assert get("/metrics", ADMIN_KEY).status_code == 200
    for path, key in (("/metrics", CAPPED_KEY), ("/metrics", ENV_CLIENT_KEY), ("/v1/models", METRICS_KEY),
                      ("/admin/status", METRICS_KEY)):
        response = get(path, key)
        assert response.status_code == 403, (path, response.status_code)
        assert_openai_error(response)


@pytest.mark.parametrize(("method", "path", "allowed"), [("PUT", "/v1/chat/completions", "POST"), ("DELETE", "/v1/models", "GET")])
def test_a_wrong_method_is_405_naming_the_allowed_ones(fuzz_server: ServerProc, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, fuzz_server.url + path, headers={"Authorization": f"Bearer {CAPPED_KEY}"}, timeout=10)
    assert response.status_code == 405
    assert_openai_error(response)
    assert allowed in response.headers.get("allow", ""), dict(response.headers)  # RFC 9110 15.5.6
