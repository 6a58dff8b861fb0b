"""Every malformed or unsupported request gets a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, ServerProc

MSG = [{"role": "user", "content": "hello"}]


def post(server: ServerProc, path: str, body: object = None, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(server.url + path, json=body, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-9", "messages": MSG}),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
    ("/v1/embeddings", {"model": "gpt-9", "input": "hi"}),
])
def test_unknown_model_is_404_model_not_found(server: ServerProc, path: str, body: dict) -> None:
    err = error_of(post(server, path, body), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-9" in err["message"]


def _context(server: ServerProc) -> int:
    model = httpx.get(server.url + f"/v1/models/{CHAT_MODEL}").json()
    return int(model["understudy"]["context_length"])


def test_prompt_longer_than_the_context_is_400_with_the_numbers(server: ServerProc) -> None:
    ctx = _context(server)
    long = "word " * (ctx + 200)
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": long}]}), 400)
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {ctx} tokens" in err["message"]
    counted = int(re.search(r"resulted in (\d+) tokens", err["message"]).group(1))  # type: ignore[union-attr]
    assert counted > ctx


def test_prompt_plus_max_tokens_over_the_context_is_400(server: ServerProc) -> None:
    ctx = _context(server)
    err = error_of(post(server, "/v1/completions", {"model": CHAT_MODEL, "prompt": "word " * (ctx - 300), "max_tokens": 500}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "500 in the completion" in err["message"]


@pytest.mark.parametrize("param,value", [
    ("n", 2),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"42": 10}),
    ("reasoning_effort", "high"),
])
def test_unsupported_chat_parameter_is_400_naming_it(server: ServerProc, param: str, value: object) -> None:
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, param: value}), 400)
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert param in err["message"]


@pytest.mark.parametrize("param,value", [("n", 3), ("echo", True), ("best_of", 2), ("suffix", "x"), ("logprobs", 2)])
def test_unsupported_completion_parameter_is_400(server: ServerProc, param: str, value: object) -> None:
    err = error_of(post(server, "/v1/completions", {"model": CHAT_MODEL, "prompt": "hi", param: value}), 400)
    assert err["param"] == param


def test_neutral_values_of_unsupported_parameters_are_accepted(server: ServerProc) -> None:
    r = post(server, "/v1/chat/completions", {
        "model": CHAT_MODEL, "messages": MSG, "max_tokens": 2, "n": 1, "logprobs": False, "tools": [],
        "response_format": {"type": "text"}, "user": "ward-7",
    })
    assert r.status_code == 200, r.text


def test_unknown_parameter_is_400_not_ignored(server: ServerProc) -> None:
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "temprature": 0.2}), 400)
    assert err["param"] == "temprature" and "Unrecognized" in err["message"]


def test_malformed_json_is_400(server: ServerProc) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        err = error_of(post(server, path, raw=b'{"model": "x", "messages": [}'), 400)
        assert err["code"] == "invalid_json"
    error_of(post(server, "/v1/chat/completions", raw=b"[1, 2]"), 400)
    error_of(post(server, "/v1/chat/completions", raw=b"\xff\xfe"), 400)


def test_wrong_types_are_400_and_do_not_echo_the_body(server: ServerProc) -> None:
    secret = "PATIENT-JANE-DOE-1962"
    r = post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": 12}], "temperature": secret})
    err = error_of(r, 400)
    assert secret not in r.text
    assert err["param"] in ("temperature", "messages.0.content")
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": -1}), 400)
    assert err["param"] == "max_tokens"
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "temperature": 3}), 400)
    assert err["param"] == "temperature"


def test_missing_required_fields_are_400(server: ServerProc) -> None:
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL}), 400)
    assert err["param"] == "messages"
    err = error_of(post(server, "/v1/chat/completions", {"messages": MSG}), 400)
    assert err["param"] == "model"
    error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": []}), 400)
    error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)


def test_text_that_is_not_valid_unicode_is_400_and_harms_nothing(server: ServerProc) -> None:
    lone = b'"\\ud800 broken"'  # a JSON string with an unpaired surrogate
    bodies = {
        "/v1/chat/completions": b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (CHAT_MODEL.encode(), lone),
        "/v1/completions": b'{"model": "%s", "prompt": %s}' % (CHAT_MODEL.encode(), lone),
        "/v1/embeddings": b'{"model": "%s", "input": [%s]}' % (EMBED_MODEL.encode(), lone),
    }
    for path, raw in bodies.items():
        err = error_of(post(server, path, raw=raw), 400)
        assert "surrogate" in err["message"]
    assert post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": "still fine"}).status_code == 200
    assert post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": 2}).status_code == 200


def test_image_content_is_refused(server: ServerProc) -> None:
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    err = error_of(post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}]}), 400)
    assert "image_url" in err["message"]


def test_embedding_errors(server: ServerProc) -> None:
    error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": []}), 400)
    error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": ""}), 400)
    error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": [[1, 2, 3]]}), 400)
    error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "encoding_format": "int8"}), 400)
    err = error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "dimensions": 128}), 400)
    assert err["param"] == "dimensions"
    err = error_of(post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": ["short", "word " * 400]}), 400)
    assert err["code"] == "context_length_exceeded" and "input[1]" in err["message"] and "256" in err["message"]
    err = error_of(post(server, "/v1/embeddings", {"model": CHAT_MODEL, "input": "x"}), 400)
    assert "/v1/chat/completions" in err["message"]
    err = error_of(post(server, "/v1/chat/completions", {"model": EMBED_MODEL, "messages": MSG}), 400)
    assert "/v1/embeddings" in err["message"]


def test_unknown_route_and_method_use_the_error_shape(server: ServerProc) -> None:
    error_of(httpx.get(server.url + "/v1/nothing-here"), 404)
    error_of(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_health_and_ready(server: ServerProc) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200
    assert r.json()["models"] == {CHAT_MODEL: "ready", EMBED_MODEL: "ready", "triage-minilm": "ready"}


def test_the_server_survived_everything_above(server: ServerProc) -> None:
    r = post(server, "/v1/chat/completions", {"model": CHAT_MODEL, "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200
    assert "Traceback" not in server.log()
