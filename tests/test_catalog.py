"""Model files are checked against their sha256 at start: a bad one is refused, the rest serve."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from models.catalog import SMOLLM2_SHA256
from tests.conftest import CHAT_MODEL, EMBED_MODEL, ROOT


def _corrupt_copy(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    with dest.open("r+b") as f:
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dest


def test_corrupted_model_is_refused_while_the_other_model_serves(start_server, smol_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = _corrupt_copy(smol_path, tmp_path / "smollm2-corrupt.gguf")
    config = f'[models.{CHAT_MODEL}]\npath = "{bad}"\n'
    with start_server(config, want_ready=False) as srv:
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "degraded" and body["models"][CHAT_MODEL] == "unavailable"
        assert str(bad) in body["unavailable"][CHAT_MODEL]
        chat = httpx.post(srv.url + "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_unavailable"
        emb = httpx.post(srv.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "still works"})
        assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 384
        lines = [line for line in srv.log().splitlines() if str(bad) in line]
        assert len(lines) == 1, lines
        assert SMOLLM2_SHA256 in lines[0] and "ERROR" in lines[0]


def test_missing_model_file_is_named_in_the_log(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gone = tmp_path / "nowhere.gguf"
    with start_server(f'[models.{CHAT_MODEL}]\npath = "{gone}"\n', want_ready=False) as srv:
        line = next(line for line in srv.log().splitlines() if str(gone) in line)
        assert "missing" in line and SMOLLM2_SHA256 in line
        assert httpx.get(srv.url + "/ready").json()["models"][EMBED_MODEL] == "ready"


def test_a_users_own_gguf_is_served_under_its_own_id(start_server, smol_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = f"""
[server]
embedded_models = false

[models.ward-assistant]
kind = "chat"
path = "{smol_path}"
sha256 = "{SMOLLM2_SHA256}"
context_length = 1024
slots = 2
"""
    with start_server(config) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["ward-assistant"]
        assert models[0]["understudy"]["context_length"] == 1024
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "ward-assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "ward-assistant"
        assert httpx.post(srv.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}).status_code == 404


def test_models_list_shows_each_models_state(smol_path: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(smol_path, tmp_path / "bad.gguf")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models.{CHAT_MODEL}]\npath = "{bad}"\n')
    out = subprocess.run([sys.executable, "-m", "server", "models", "list", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:3]}
    assert rows[CHAT_MODEL][3] == "corrupt" and rows[EMBED_MODEL][3] == "ok"
    assert SMOLLM2_SHA256 in out.stdout
