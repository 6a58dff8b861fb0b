"""API keys (constant-time compare) and logs that never contain patient text."""

from __future__ import annotations

import httpx
import openai

from tests.conftest import CHAT_MODEL, EMBED_MODEL


def test_a_key_matches_only_itself_whole() -> None:
    from server.auth import bearer_token
    from server.keys import KeyStore

    store = KeyStore(("k1-aaaaaaaaaaaaaaaa", "k2-bbbbbbbbbbbbbbbb"))
    match = store.match("k2-bbbbbbbbbbbbbbbb")
    assert match is not None and match.role == "client" and match.id.startswith("env-")
    for header in (None, "", "Bearer", "Basic k1-aaaaaaaaaaaaaaaa", "Bearer k3", "Bearer k1-aaaaaaaaaaaaaaaax", "Bearer k1-aaaa"):
        token = bearer_token(header)
        assert token is None or store.match(token) is None, header


def test_server_with_keys_refuses_requests_without_one(start_server) -> None:  # type: ignore[no-untyped-def]
    config = '[server]\napi_key_env = "TEST_UNDERSTUDY_KEYS"\n'
    with start_server(config, env={"TEST_UNDERSTUDY_KEYS": "alpha-key,beta-key"}) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # liveness stays open
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="beta-key", max_retries=0) as client:
            assert client.embeddings.create(model=EMBED_MODEL, input="x").data


def test_no_patient_text_in_the_log_even_at_debug_level(start_server) -> None:  # type: ignore[no-untyped-def]
    marker = "Mrs Marker-Zebra-4471 has chest pain"
    with start_server('[server]\nlog_level = "debug"\n') as srv:
        requests = [
            ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 4}),
            ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 4}),
            ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": marker}], "temperature": marker}),
            ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": marker * 2000}]}),
            ("/v1/completions", {"model": CHAT_MODEL, "prompt": marker, "stop": [marker], "max_tokens": 4}),
            ("/v1/embeddings", {"model": EMBED_MODEL, "input": [marker, "word " * 400]}),
            ("/v1/embeddings", {"model": marker, "input": marker}),
        ]
        statuses = [httpx.post(srv.url + path, json=body, timeout=60).status_code for path, body in requests]
        assert statuses == [200, 200, 400, 400, 200, 400, 404]
        log = srv.log()
        assert "POST /v1/chat/completions" in log  # the debug access log is on...
        assert "Marker-Zebra" not in log  # ... and carries no patient text
