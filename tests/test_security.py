"""Operations and security at the edge: keys and roles on every route, key rotation without a
restart, per-key limits, Host allow-list, no CORS, JSON bombs, TLS, refusing an open public bind,
and the metrics a Prometheus scrape gets."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.config import ConfigError, parse_config
from tests.conftest import ROOT, TEST_CACHE, ServerProc, free_port, run_server

CLIENT, ADMIN, METRICS = "client-key-aaaaaaaaaaaa", "admin-key-bbbbbbbbbbbb", "metrics-key-cccccccccccc"
ENV = {"UNDERSTUDY_API_KEYS": CLIENT, "UNDERSTUDY_ADMIN_KEY": ADMIN, "UNDERSTUDY_METRICS_KEY": METRICS}
CHAT_MODEL = "smollm2-135m-instruct"
ROUTES = [
    ("GET", "/v1/models", None), ("GET", "/v1/models/smollm2-135m-instruct", None),
    ("POST", "/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": CHAT_MODEL, "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"model": "minilm-l6-v2", "input": "hi"}),
    ("POST", "/v1/triage", {"input": "chest pain"}), ("POST", "/v1/summarize", {"input": "Patient well."}),
    ("GET", "/openapi.json", None), ("GET", "/no/such/route", None),
    ("GET", "/admin/status", None), ("GET", "/admin/hardware", None), ("GET", "/admin/readiness", None),
    ("GET", "/admin/events", None), ("GET", "/admin/drill", None), ("DELETE", "/admin/drill", None),
    ("GET", "/metrics", None),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("keyed")
    keyfile = tmp / "keys.txt"
    keyfile.write_text("# id key options\nward-7 ward7-key-dddddddddddd rpm=60 burst=2\n"
                       "capped capped-key-eeeeeeeeeeee max_tokens=5 max_prompt_tokens=20\n")
    with run_server(tmp, f'[server]\nkey_file = "{keyfile}"\n', env=ENV) as srv:
        srv.extra["keyfile"] = keyfile
        yield srv


def call(srv: ServerProc, method: str, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.request(method, srv.url + path, json=body, headers=headers or {}, timeout=60)


def test_every_route_but_health_and_ready_needs_a_key_and_each_role_only_opens_its_routes(keyed: ServerProc) -> None:
    for method, path, body in ROUTES:
        r = call(keyed, method, path, body)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json()["error"]["type"] == "authentication_error"
        assert call(keyed, method, path, body, bearer("wrong-key-zzzzzzzzzzzz")).status_code == 401
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ready").status_code == 200
    for method, path, body in ROUTES:
        admin_route = path.startswith("/admin") or path == "/metrics"
        as_client = call(keyed, method, path, body, bearer(CLIENT))
        as_metrics = call(keyed, method, path, body, bearer(METRICS))
        as_admin = call(keyed, method, path, body, bearer(ADMIN))
        assert (as_client.status_code == 403) == admin_route, (path, as_client.status_code)
        assert (as_metrics.status_code == 403) == (path != "/metrics"), (path, as_metrics.status_code)
        assert as_admin.status_code not in (401, 403), (path, as_admin.status_code)
        if as_client.status_code == 403:
            assert as_client.json()["error"]["code"] == "insufficient_permissions"


def test_a_keys_rate_limit_answers_429_with_retry_after(keyed: ServerProc) -> None:
    codes = [call(keyed, "GET", "/v1/models", None, bearer("ward7-key-dddddddddddd")) for _ in range(4)]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    limited = codes[-1]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    assert call(keyed, "GET", "/v1/models", None, bearer(CLIENT)).status_code == 200  # other keys are not limited


def test_a_keys_token_caps_are_400s_naming_the_cap(keyed: ServerProc) -> None:
    key = bearer("capped-key-eeeeeeeeeeee")
    ok = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    assert call(keyed, "POST", "/v1/chat/completions", ok, key).status_code == 200
    r = call(keyed, "POST", "/v1/chat/completions", {**ok, "max_tokens": 50}, key)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "(5)" in r.json()["error"]["message"]
    long = {**ok, "messages": [{"role": "user", "content": "word " * 100}]}
    r = call(keyed, "POST", "/v1/chat/completions", long, key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "key_limit_exceeded"


def test_keys_rotate_on_sighup_and_a_broken_file_keeps_the_old_keys(keyed: ServerProc) -> None:
    keyfile: Path = keyed.extra["keyfile"]  # type: ignore[assignment]
    new = "night-shift-key-ffffffffffff"
    assert call(keyed, "GET", "/admin/status", None, bearer(new)).status_code == 401
    keyfile.write_text(keyfile.read_text() + f"night {new} role=admin\n")
    os.kill(keyed.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while call(keyed, "GET", "/admin/status", None, bearer(new)).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.1)
    keyfile.write_text("this line has no key\n")
    os.kill(keyed.process.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert call(keyed, "GET", "/admin/status", None, bearer(new)).status_code == 200
    assert "keys not reloaded" in keyed.log() and "keys.txt:1" in keyed.log()
    admin = call(keyed, "GET", "/admin/events?kind=admin", None, bearer(ADMIN)).json()["data"]
    assert {"keys_reload", "keys_reload_failed"} <= {row["reason"] for row in admin}


def test_host_header_allow_list_and_no_cors(keyed: ServerProc) -> None:
    r = httpx.get(keyed.url + "/health", headers={"Host": "rebind.attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(keyed.url + "/health", headers={"Host": f"localhost:{keyed.url.rsplit(':', 1)[1]}"}).status_code == 200
    r = httpx.get(keyed.url + "/v1/models", headers={"Origin": "http://attacker.example", **bearer(CLIENT)})
    assert r.status_code == 200 and not any(h.lower().startswith("access-control") for h in r.headers)
    pre = httpx.options(keyed.url + "/v1/chat/completions", headers={"Origin": "http://attacker.example",
                                                                       "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/admin/drill"])
def test_json_bombs_are_400_never_500(keyed: ServerProc, path: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(keyed.url + path, content=deep, headers={"Content-Type": "application/json", **bearer(ADMIN)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    nested: object = "x"
    for _ in range(40):
        nested = {"a": nested}
    r = httpx.post(keyed.url + path, json={"model": CHAT_MODEL, "input": nested}, headers=bearer(ADMIN))
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_metrics_follow_the_requests_and_carry_no_request_text(keyed: ServerProc) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Mr Canary-Metrics-9 says hi"}],
            "max_tokens": 8, "stream": True}
    with httpx.stream("POST", keyed.url + "/v1/chat/completions", json=body, headers=bearer(CLIENT), timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    text = call(keyed, "GET", "/metrics", None, bearer(METRICS)).text
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('understudy_requests_total{endpoint="chat",route="local",status="200",workload="none"}') >= 1
    assert value('understudy_time_to_first_token_seconds_count{model="smollm2-135m-instruct",route="local"}') >= 1
    assert value('understudy_inter_token_latency_seconds_count{model="smollm2-135m-instruct",route="local"}') >= 1
    assert value('understudy_generation_tokens_total{model="smollm2-135m-instruct",route="local"}') >= 1
    assert 'understudy_num_requests_waiting{model="minilm-l6-v2"}' in text
    assert 'understudy_kv_cache_usage_ratio{model="smollm2-135m-instruct"}' in text
    assert 'understudy_model_ready{model="triage-minilm",state="ready"} 1.0' in text
    assert value("understudy_process_resident_memory_bytes") > 10_000_000
    assert "Canary" not in text


def test_an_open_public_bind_is_refused_and_plain_http_clouds_too(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 2 and "--insecure-no-auth" in out.stderr and out.stderr.count("\n") == 1
    up = {"upstreams": [{"name": "c", "base_url": "http://cloud.example.org/v1"}]}
    with pytest.raises(ConfigError, match="allow_plain_http"):
        parse_config(up, tmp_path, {})
    up["upstreams"][0]["allow_plain_http"] = True
    assert parse_config(up, tmp_path, {}).upstreams[0].base_url.startswith("http://")
    assert parse_config({"upstreams": [{"name": "c", "base_url": "http://127.0.0.1:9/v1"}]}, tmp_path, {}).upstreams


def test_https_is_served_when_a_certificate_is_configured(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'cache_dir = "{TEST_CACHE}"\n')
    trust = ssl.create_default_context(cafile=str(cert))
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/health", verify=trust, timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        assert r.status_code == 200 and r.http_version == "HTTP/1.1"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)  # plain HTTP is not answered
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_a_key_file_emptied_by_a_reload_never_opens_the_server(tmp_path: Path) -> None:
    from server.edge import host_name
    from server.keys import KeyFileError, KeyStore

    keyfile = tmp_path / "keys"
    keyfile.write_text("ops ops-key-0123456789abcdef role=admin rpm=60\n")
    store = KeyStore(key_file=keyfile)
    keyfile.write_text("# every key revoked\n")
    with pytest.raises(KeyFileError, match="no key left"):
        store.reload()
    assert store.enabled and store.match("ops-key-0123456789abcdef") is not None  # the old keys stay
    assert KeyStore(key_file=keyfile).enabled  # a key file with no key: every call is a 401, not an open server
    assert KeyStore(key_file=keyfile).match("") is None
    keyfile.write_text("ops ops-key-0123456789abcdef rpm=inf\n")
    with pytest.raises(KeyFileError, match="finite"):
        KeyStore(key_file=keyfile)
    keyfile.write_bytes(b"ops \xff\xfe-not-utf8-key-000000\n")
    with pytest.raises(KeyFileError, match="UTF-8"):
        KeyStore(key_file=keyfile)
    assert host_name("Box.Local:8080") == "box.local" and host_name("[::1]:8080") == "::1"
