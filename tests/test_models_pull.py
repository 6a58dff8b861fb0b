"""``understudy models pull`` / ``verify``: resumable downloads verified before they get their name.

The HTTP side is ``RangeFileServer`` (scripts/bench_pull.py): a loopback HTTP/1.1 server with
Range, If-Range, TCP_NODELAY, and faults on demand (cut the connection after N bytes, ignore
Range, answer an error status). It counts the body bytes it sends, so the tests assert what was
downloaded again. Files are a few MB, made here; the end-to-end test pulls the embedded SmolLM2
GGUF from a file:// URL under a new id and serves it.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench_pull import RangeFileServer
from models.catalog import SMOLLM2_SHA256
from server.cli import main
from server.config import ConfigError, load_config
from server.models_pull import BadContent, PullError, _Partial, fetch, gguf_head, update_catalog
from tests.conftest import run_server

SIZE = 3_000_000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def data() -> bytes:
    return random.Random(14).randbytes(SIZE)


@pytest.fixture
def srv(data: bytes) -> Iterator[RangeFileServer]:
    with RangeFileServer({"m.bin": data}) as s:
        yield s


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def gguf(arch: str, pad_to: int = 1 << 20) -> bytes:
    """A GGUF v3 header with only general.architecture (no tensors), padded with zeros."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("general.architecture") + struct.pack("<I", 8) + s(arch)
    return out + b"\0" * max(0, pad_to - len(out))


# --- downloads ---------------------------------------------------------------------------------


def test_an_interrupted_download_resumes_and_fetches_only_the_rest(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "m.bin"
    srv.cut_after = 1_000_000
    with pytest.raises(PullError, match="interrupted .* run the same command again to resume"):
        fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert not dest.exists() and _left(tmp_path) == ["m.bin.partial", "m.bin.partial.json"]
    assert (tmp_path / "m.bin.partial").stat().st_size == 1_000_000 == srv.sent
    srv.sent = 0
    got = fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert srv.requests[-1] == ("m.bin", "bytes=1000000-", 206)
    assert srv.sent == SIZE - 1_000_000 == got.received and got.resumed_from == [1_000_000] and not got.restarts
    assert dest.read_bytes() == data and _left(tmp_path) == ["m.bin"]


def test_the_command_resumes_by_itself_after_a_cut(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    srv.cut_after = 1_500_000
    got = fetch(srv.url("m.bin"), tmp_path / "m.bin", _sha(data), retries=2, retry_delay=0)
    assert srv.sent == SIZE and got.resumed_from == [1_500_000]  # not a byte twice
    assert (tmp_path / "m.bin").read_bytes() == data


def test_a_wrong_hash_is_refused_and_nothing_is_left(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(BadContent, match=f"sha256 mismatch: expected {wrong}.*{_sha(data)}.*nothing was written under m.bin"):
        fetch(srv.url("m.bin"), tmp_path / "m.bin", wrong, retries=0)
    assert _left(tmp_path) == []  # no partial either: a full file with the wrong hash cannot be resumed


def test_a_stale_partial_is_downloaded_again_once_from_zero(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "m.bin"
    part = _Partial(dest, srv.url("m.bin"), _sha(data))
    part.start(None, SIZE)
    part.path.write_bytes(b"x" * 1000)  # wrong bytes: resumes, mismatches, then once more from zero
    got = fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert got.resumed_from == [1000] and "stale" in got.restarts[0]
    assert srv.sent == SIZE - 1000 + SIZE and dest.read_bytes() == data


def test_a_server_that_ignores_range_restarts_cleanly_from_zero(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "m.bin"
    srv.cut_after = 1_000_000
    with pytest.raises(PullError):
        fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    srv.ignore_range, srv.sent = True, 0
    got = fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert srv.requests[-1][1:] == ("bytes=1000000-", 200)
    assert "200 instead of 206" in got.restarts[0] and srv.sent == SIZE == got.received
    assert dest.read_bytes() == data and _left(tmp_path) == ["m.bin"]


def test_416_on_a_complete_partial_verifies_it_and_on_a_longer_one_restarts(srv: RangeFileServer, data: bytes,
                                                                              tmp_path: Path) -> None:
    dest = tmp_path / "m.bin"
    part = _Partial(dest, srv.url("m.bin"), _sha(data))
    part.start(None, SIZE)
    part.path.write_bytes(data)  # complete, but never renamed (the command was stopped)
    got = fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert srv.requests[-1][2] == 416 and srv.sent == 0 and got.received == 0 and dest.read_bytes() == data
    dest.unlink()
    part.start(None, None)
    part.path.write_bytes(data + b"extra")
    got = fetch(srv.url("m.bin"), dest, _sha(data), retries=0)
    assert "416" in got.restarts[0] and srv.sent == SIZE and dest.read_bytes() == data


def test_http_errors_are_clear(srv: RangeFileServer, data: bytes, tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"HTTP 404 Not Found \(check the URL\)"):
        fetch(srv.url("nope.bin"), tmp_path / "m.bin", _sha(data), retries=3, retry_delay=0)
    assert len(srv.requests) == 1  # a 404 is not retried
    srv.status = 503
    with pytest.raises(PullError, match="interrupted \\(HTTP 503 .*nothing was received"):
        fetch(srv.url("m.bin"), tmp_path / "m.bin", _sha(data), retries=1, retry_delay=0)
    assert len(srv.requests) == 3 and _left(tmp_path) == []


def test_an_html_page_is_refused_at_its_first_bytes(tmp_path: Path) -> None:
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>" + b" " * 100_000
    with RangeFileServer({"model.gguf": page}) as s:
        with pytest.raises(BadContent, match="not a GGUF file: it starts with an HTML page"):
            fetch(s.url("model.gguf"), tmp_path / "model.gguf", _sha(page), head_check=gguf_head, retries=0)
    assert _left(tmp_path) == []


def test_file_urls_work_and_resume(data: bytes, tmp_path: Path) -> None:
    src = tmp_path / "src" / "m.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    dest = tmp_path / "out" / "m.bin"
    got = fetch(src.as_uri(), dest, _sha(data))
    assert dest.read_bytes() == data and got.received == SIZE
    dest.unlink()
    part = _Partial(dest, src.as_uri(), _sha(data))
    st = src.stat()
    part.start(f"{st.st_mtime_ns}:{st.st_size}", SIZE)
    part.path.write_bytes(data[:2_000_000])
    got = fetch(src.as_uri(), dest, _sha(data))
    assert got.resumed_from == [2_000_000] and got.received == SIZE - 2_000_000 and dest.read_bytes() == data
    again = fetch(str(src), dest, _sha(data))  # a plain path, already here: nothing copied
    assert again.reused and again.received == 0
    with pytest.raises(PullError, match="does not exist"):
        fetch((tmp_path / "gone.bin").as_uri(), tmp_path / "out" / "g.bin", _sha(data))


# --- the command -------------------------------------------------------------------------------


def _config(tmp_path: Path, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "understudy.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n{extra}')
    return cfg


def _pull(cfg: Path, url: str, model_id: str, sha: str, *more: str) -> int:
    return main(["models", "pull", url, "--id", model_id, "--kind", "chat", "--sha256", sha, "--config", str(cfg),
                 "--retries", "0", *more])


def test_pull_refuses_a_non_gguf_file(srv: RangeFileServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert _pull(cfg, srv.url("m.bin"), "junk", _sha(data)) == 1
    err = capsys.readouterr().err
    assert "pull failed" in err and "not a GGUF file: it starts with bytes" in err
    assert _left(tmp_path / "state" / "models") == [".junk.pull.lock"]
    assert not (tmp_path / "state" / "models.toml").exists()


def test_pull_with_a_wrong_hash_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, body = _config(tmp_path), gguf("llama")
    with RangeFileServer({"m.gguf": body}) as s:
        assert _pull(cfg, s.url("m.gguf"), "wrong", "ab" * 32) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert _left(tmp_path / "state" / "models") == [".wrong.pull.lock"]
    assert not (tmp_path / "state" / "models.toml").exists()


def test_pull_refuses_an_architecture_this_llama_cpp_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    # With llama.cpp's own list of architectures (its llm_arch_name, when the library exports it),
    # else from its loader ("unknown model architecture: 'notanarch'").
    for arch, why in (("notanarch", "'notanarch'"), ("llama", "cannot load it: error loading model vocabulary")):
        src = tmp_path / f"{arch}.gguf"
        src.write_bytes(gguf(arch))
        assert _pull(cfg, src.as_uri(), arch, _sha(src.read_bytes())) == 1
        err = capsys.readouterr().err
        assert why in err and "matches its sha256 but cannot be served" in err, err
        assert not (tmp_path / "state" / "models" / arch).exists()
    assert not (tmp_path / "state" / "models.toml").exists()


def test_pull_checks_its_arguments_and_the_config_before_downloading(srv: RangeFileServer, data: bytes, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, f'\n[models.taken]\nkind = "chat"\npath = "/srv/x.gguf"\nsha256 = "{"c" * 64}"\n')
    assert _pull(cfg, srv.url("m.bin"), "taken", _sha(data)) == 2
    assert "models.taken.path: is '/srv/x.gguf' in" in capsys.readouterr().err
    assert _pull(cfg, srv.url("m.bin"), "smollm2-135m-instruct", _sha(data)) == 2
    assert "an embedded model's id" in capsys.readouterr().err
    assert _pull(cfg, srv.url("m.bin"), "bad id", _sha(data)) == 2
    assert main(["models", "pull", srv.url("m.bin"), "--id", "e", "--kind", "embedding", "--sha256", _sha(data),
                 "--config", str(cfg)]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert srv.requests == []  # nothing was downloaded


def test_models_file_and_conflicts_with_the_config(tmp_path: Path) -> None:
    catalog = tmp_path / "pulled" / "models.toml"
    update_catalog(catalog, "llama-3.2-3b", {"kind": "chat", "format": "gguf", "path": "x/a.gguf", "sha256": "a" * 64},
                   ["# pulled from https://mirror/a.gguf"])
    update_catalog(catalog, "other", {"kind": "chat", "format": "gguf", "path": "/abs/b.gguf", "sha256": "b" * 64})
    text = catalog.read_text()
    assert '[models."llama-3.2-3b"]' in text and "# pulled from https://mirror/a.gguf\n[models.\"llama-3.2-3b\"]" in text
    assert list(tomllib.loads(text)["models"]) == ["llama-3.2-3b", "other"]
    cfg = tmp_path / "understudy.toml"
    cfg.write_text('[server]\nmodels_file = "pulled/models.toml"\nembedded_models = false\n\n[models."llama-3.2-3b"]\nslots = 2\n')
    config = load_config(cfg)
    specs = {m.id: m for m in config.models}
    assert specs["llama-3.2-3b"].path == tmp_path / "pulled" / "x" / "a.gguf"  # relative to the catalog's folder
    assert specs["llama-3.2-3b"].options.slots == 2 and specs["llama-3.2-3b"].source == "pulled"
    assert config.server.catalog_file == catalog
    cfg.write_text(cfg.read_text() + f'sha256 = "{"d" * 64}"\n')
    with pytest.raises(ConfigError, match=r'models.llama-3.2-3b.sha256: is .* in .*understudy.toml and .* in .*models.toml'):
        load_config(cfg)
    update_catalog(catalog, "llama-3.2-3b", None)
    assert "llama-3.2-3b" not in catalog.read_text() and "other" in catalog.read_text()


def test_models_verify_finds_a_corrupted_and_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "embedded_models = false\n")
    files = {}
    for name in ("one", "two"):
        f = tmp_path / f"{name}.gguf"
        f.write_bytes(gguf(name, 200_000))
        files[name] = f
        update_catalog(tmp_path / "state" / "models.toml", name,
                       {"kind": "chat", "format": "gguf", "path": str(f), "sha256": _sha(f.read_bytes())})
    assert main(["models", "verify", "--config", str(cfg)]) == 0
    assert "2 files: 2 ok, 0 missing, 0 corrupt" in capsys.readouterr().out
    with files["one"].open("r+b") as f:
        f.seek(100_000)
        f.write(b"\x01")
    assert main(["models", "verify", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["corrupt", "one"] and "does not match its sha256" in out
    files["two"].unlink()
    assert main(["models", "verify", "--config", str(cfg)]) == 1
    assert "0 ok, 1 missing, 1 corrupt" in capsys.readouterr().out


def test_a_pulled_gguf_is_served(smol_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = tmp_path / "mirror" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    mirror.parent.mkdir()
    try:
        os.link(smol_path, mirror)  # a mirror of the embedded file, without copying 98 MB
    except OSError:
        mirror.write_bytes(smol_path.read_bytes())
    srv_dir = tmp_path / "srv"
    cfg = _config(srv_dir)  # the state_dir run_server gives the server below
    assert _pull(cfg, mirror.as_uri(), "ward-smol", SMOLLM2_SHA256) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "pulled chat model 'ward-smol' (llama, vocabulary 49152" in out
    pulled = srv_dir / "state" / "models" / "ward-smol" / mirror.name
    assert pulled.is_file() and not pulled.with_name(pulled.name + ".partial").exists()
    table = tomllib.loads((srv_dir / "state" / "models.toml").read_text())["models"]["ward-smol"]
    assert table == {"kind": "chat", "format": "gguf", "path": str(pulled), "sha256": SMOLLM2_SHA256}
    assert _pull(cfg, mirror.as_uri(), "ward-smol", SMOLLM2_SHA256) == 0  # again: already here, nothing copied
    assert "already here with the right sha256" in capsys.readouterr().err
    with run_server(srv_dir, '[server]\nembedded_models = false\n\n[models.ward-smol]\nslots = 1\n') as server:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["ward-smol"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "ward-smol", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "ward-smol" and r.json()["choices"][0]["message"]["content"]


def test_an_onnx_embedding_model_is_pulled_with_its_tokenizer(smol_path: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from models.catalog import MINILM_SHA256, MINILM_TOKENIZER_SHA256, default_catalog

    minilm = default_catalog()[1]
    assert minilm.path is not None and minilm.tokenizer_path is not None
    cfg = _config(tmp_path, "embedded_models = false\n")

    def pull(model: Path, sha: str, tokenizer: Path, tokenizer_sha: str) -> int:
        return main(["models", "pull", model.as_uri(), "--id", "mini", "--kind", "embedding", "--sha256", sha,
                     "--tokenizer", tokenizer.as_uri(), "--tokenizer-sha256", tokenizer_sha, "--config", str(cfg)])

    assert pull(smol_path, SMOLLM2_SHA256, minilm.tokenizer_path, MINILM_TOKENIZER_SHA256) == 1
    assert "not an ONNX model: it is a GGUF file" in capsys.readouterr().err
    assert pull(minilm.path, MINILM_SHA256, minilm.tokenizer_path, MINILM_TOKENIZER_SHA256) == 0
    assert "pulled embedding model 'mini' (384 dimensions" in capsys.readouterr().out
    spec = next(m for m in load_config(cfg).models if m.id == "mini")
    folder = tmp_path / "state" / "models" / "mini"
    assert (spec.path, spec.sha256, spec.tokenizer_path, spec.tokenizer_sha256) == (
        folder / "model.onnx", MINILM_SHA256, folder / "tokenizer.json", MINILM_TOKENIZER_SHA256)
    assert spec.path.read_bytes() == minilm.path.read_bytes() and spec.source == "pulled"
