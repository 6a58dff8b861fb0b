"""Bringing models in: download a model file with resume, verify it, then put it in place.

Used by ``understudy models pull`` (``server.cli_models``). ``fetch`` downloads one file from an
``http(s)://`` URL (any mirror), a ``file://`` URL or a plain path into ``<dest>.partial``:

- **resume**: an existing partial of the same file (its sidecar ``<dest>.partial.json`` records the
  expected sha256 and the server's validator) is hashed first, then only the rest is asked for
  (``Range: bytes=N-``, with ``If-Range`` when the server gave a strong ETag or a Last-Modified).
  A server that ignores the range (200 instead of 206), answers another range, or whose file
  changed starts the download again cleanly from zero; a 416 means the partial is already
  complete (then it is verified) or longer than the file (then it is discarded). An interrupted
  transfer is resumed by itself ``retries`` times (1, 2, 4... s apart), then the partial is kept
  and the message says to run the same command again.
- **verify before install**: the sha256 is computed while the bytes arrive; the file is checked
  (``check``: a GGUF header and llama.cpp's own loader, an ONNX session, a tokenizer) and only
  then fsynced and renamed onto its final name (atomic): a half-written or wrong file never has
  the model's name. A wrong hash or a file that fails its check deletes the partial.

``check_gguf`` reads the header with ``models.gguf.read_gguf`` and then, in a subprocess (llama.cpp
aborts the whole process on some malformed files), lists the architectures this llama.cpp knows
(its ``llm_arch_name``) and loads the vocabulary only (``vocab_only``, which also rejects an
unknown pre-tokenizer and a broken chat template). ``update_catalog`` writes the catalog file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from server.toml_write import toml_key, toml_value

_CHUNK = 1 << 20
_HEAD = 64
"""Bytes looked at before the rest of a fresh download is accepted (``head_check``)."""
MAX_RESTARTS = 3
ROOT = Path(__file__).resolve().parent.parent


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PullError(Exception):
    """A pull that failed; the message says what happened and what is left on disk."""


class BadContent(PullError):
    """The bytes are not what was asked for (wrong hash, not a GGUF file...): the partial is deleted."""


class _Interrupted(Exception):
    """The transfer stopped early; the partial keeps what arrived (resumable)."""


class _Restart(Exception):
    """Start again from zero now (the partial was discarded). Not a failed attempt."""


def say(message: str) -> None:
    print(f"understudy: {message}", file=sys.stderr, flush=True)


def mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def redact(url: str) -> str:
    """A URL for messages and the catalog's comments: no user:password, no query (signed URLs)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def local_source(url: str) -> Path | None:
    """The file a ``file://`` URL or a plain path names; None for http(s)."""
    if "://" not in url:
        return Path(os.path.expanduser(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise PullError(f"{url}: a file:// URL names a file on this machine (file:///path), not on {parts.netloc}")
        return Path(unquote(parts.path))
    if parts.scheme in ("http", "https"):
        return None
    raise PullError(f"{url}: only http://, https:// and file:// URLs (or a plain path) can be pulled")


def file_name(url: str, fallback: str) -> str:
    """The last segment of the URL's path, made safe as a file name."""
    path = urlsplit(url).path if "://" in url else url
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(path.rstrip("/").rsplit("/", 1)[-1])).lstrip(".")
    return name if name and not name.endswith((".partial", ".json", ".lock")) else fallback


# ---------------------------------------------------------------------------------------------
# What the first bytes say (a mirror's HTML error page with status 200 is the classic)


def describe_head(head: bytes) -> str:
    if not head:
        return "nothing (the file is empty)"
    low = head.lstrip()[:16].lower()
    if low.startswith((b"<!doctype", b"<html", b"<head", b"<?xml", b"<body")):
        return "an HTML page (an error or login page from the server?)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file (convert it to GGUF with llama.cpp's convert_hf_to_gguf.py)"
    if low.startswith((b"{", b"[")):
        return "a JSON document"
    return f"bytes {head[:8]!r}"


def gguf_head(head: bytes) -> None:
    if not head:
        raise BadContent("the file is empty")
    if not head.startswith(b"GGUF"):
        raise BadContent(f"not a GGUF file: it starts with {describe_head(head)}, not with 'GGUF'")


def onnx_head(head: bytes) -> None:
    what = describe_head(head)
    if not what.startswith("bytes"):
        raise BadContent(f"not an ONNX model: it is {what}")


def tokenizer_head(head: bytes) -> None:
    if not head.lstrip().startswith(b"{"):
        raise BadContent(f"not a tokenizer.json: it starts with {describe_head(head)}, not with '{{'")


# ---------------------------------------------------------------------------------------------
# Download


@dataclasses.dataclass
class Fetched:
    path: Path
    sha256: str
    size: int
    received: int = 0
    """Bytes transferred by this call (over the network, or copied), over every attempt."""
    resumed_from: list[int] = dataclasses.field(default_factory=list)
    """The offsets each resumed transfer started at."""
    restarts: list[str] = dataclasses.field(default_factory=list)
    """Why the download started again from zero, when it did."""
    reused: bool = False
    """The file was already in place with the right sha256: nothing was transferred."""
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What ``check`` found (architecture, vocabulary size, dimensions...)."""


class _Partial:
    """``<dest>.partial`` and its sidecar ``<dest>.partial.json`` (which file it is a partial of)."""

    def __init__(self, dest: Path, url: str, sha256: str) -> None:
        self.path = dest.with_name(dest.name + ".partial")
        self.meta_path = dest.with_name(dest.name + ".partial.json")
        self.url, self.sha256 = url, sha256
        self.meta: dict[str, Any] = {}

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def offset(self) -> int:
        """Where to resume: the partial's size when it is a partial of this same file, else 0."""
        if not self.path.exists():
            self.meta_path.unlink(missing_ok=True)
            return 0
        try:
            self.meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            self.meta = {}
        if self.meta.get("sha256") != self.sha256:
            say(f"discarding {self.path.name}: a partial download of another file")
            self.discard()
            return 0
        return self.size()

    def start(self, validator: str | None, size: int | None) -> None:
        self.meta = {"url": redact(self.url), "sha256": self.sha256, "validator": validator, "size": size}
        self.meta_path.write_text(json.dumps(self.meta) + "\n")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.meta = {}


def _hash_existing(path: Path, n: int) -> Any:
    digest = hashlib.sha256()
    if n >= 256 * _CHUNK:
        say(f"hashing the {mb(n)} already downloaded")
    with path.open("rb") as f:
        left = n
        while left and (chunk := f.read(min(_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest


@contextlib.contextmanager
def _bar(desc: str, total: int | None, initial: int, progress: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
              disable=not progress, mininterval=0.5, leave=False, dynamic_ncols=True) as bar:
        yield bar


def _write(chunks: Iterable[bytes], part: _Partial, offset: int, total: int | None, digest: Any, got: Fetched,
           head_check: Callable[[bytes], None] | None, desc: str, progress: bool) -> int:
    """Append ``chunks`` to the partial (from ``offset``), hashing them; returns the new size.
    A fresh download's first bytes go through ``head_check`` before anything else is accepted."""
    size = offset
    head = b"" if offset == 0 and head_check is not None else None
    with part.path.open("ab" if offset else "wb") as f, _bar(desc, total, offset, progress) as bar:
        for chunk in chunks:
            if head is not None:
                head += chunk[:_HEAD]
                if len(head) >= _HEAD:
                    head_check(head)  # type: ignore[misc]
                    head = None
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            got.received += len(chunk)
            bar.update(len(chunk))
        if head is not None:
            head_check(head)  # type: ignore[misc]
    return size


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``): (START, TOTAL), None where absent or ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _validator(headers: Any) -> str | None:
    """What ``If-Range`` may carry: a strong ETag, else Last-Modified."""
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("last-modified")


def _http_once(client: Any, url: str, part: _Partial, got: Fetched, head_check: Callable[[bytes], None] | None,
               progress: bool) -> tuple[str, int]:
    import httpx

    offset = part.offset()
    digest = _hash_existing(part.path, offset) if offset else hashlib.sha256()
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if part.meta.get("validator"):
            headers["If-Range"] = part.meta["validator"]
    try:
        with client.stream("GET", url, headers=headers) as r:
            status = r.status_code
            if status == 416:
                _, total = _content_range(r.headers.get("content-range"))
                if offset and total == offset:
                    say(f"{part.path.name} is already complete ({mb(offset)}); verifying it")
                    return digest.hexdigest(), offset
                part.discard()
                raise _Restart(f"the server refused the range from byte {offset} (416 Range Not Satisfiable; the file is "
                               f"{'of unknown size' if total is None else mb(total)}, the partial download {mb(offset)})")
            if status == 206:
                start, total = _content_range(r.headers.get("content-range"))
                if start != offset or total is None:
                    part.discard()
                    raise _Restart(f"the server answered a range from byte {start} (of {total}) to a request from byte {offset}")
                if part.meta.get("size") not in (None, total):
                    part.discard()
                    raise _Restart(f"the file on the server is now {total} bytes, {part.meta['size']} when the download began")
                if offset:
                    got.resumed_from.append(offset)
                say(f"resuming {part.path.name[:-len('.partial')]} at {mb(offset)} of {mb(total)}")
            elif status == 200:
                if offset:
                    why = ("the server ignored the Range request (200 instead of 206)" if "If-Range" not in headers
                           else "the server sent the whole file (200 instead of 206: it changed, or ignores ranges)")
                    got.restarts.append(why)
                    say(f"{why}: starting again from zero")
                    offset, digest = 0, hashlib.sha256()
                length = r.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
            elif status in (408, 425, 429) or status >= 500:
                raise _Interrupted(f"HTTP {status} {r.reason_phrase}")
            else:
                hint = {401: " (the mirror wants credentials)", 403: " (access denied)", 404: " (check the URL)"}.get(status, "")
                raise PullError(f"{redact(url)}: HTTP {status} {r.reason_phrase}{hint}")
            if offset == 0:
                part.start(_validator(r.headers), total)
            size = _write(r.iter_raw(), part, offset, total, digest, got, head_check, part.path.name[:-len(".partial")],
                          progress)
    except httpx.TransportError as exc:  # refused, reset, timed out, cut: resumable
        raise _Interrupted(str(exc) or type(exc).__name__) from None
    except httpx.HTTPError as exc:  # too many redirects, an invalid URL
        raise PullError(f"{redact(url)}: {exc}") from None
    if total is not None and size < total:
        raise _Interrupted(f"the transfer ended at {size} of {total} bytes")
    if total is not None and size > total:
        raise BadContent(f"the server sent {size} bytes for a file it announced as {total} bytes")
    return digest.hexdigest(), size


def _file_once(source: Path, part: _Partial, got: Fetched, head_check: Callable[[bytes], None] | None,
               progress: bool) -> tuple[str, int]:
    try:
        src = source.open("rb")
    except FileNotFoundError:
        raise PullError(f"{source} does not exist") from None
    except IsADirectoryError:
        raise PullError(f"{source} is a folder, not a model file") from None
    except OSError as exc:
        raise PullError(f"{source} cannot be read ({exc.strerror})") from None
    with src:
        st = os.fstat(src.fileno())
        total, validator = st.st_size, f"{st.st_mtime_ns}:{st.st_size}"
        offset = part.offset()
        if offset and (offset > total or part.meta.get("validator") != validator):
            part.discard()
            raise _Restart(f"{source} changed since {part.path.name} was begun")
        digest = _hash_existing(part.path, offset) if offset else hashlib.sha256()
        if offset and offset == total:
            return digest.hexdigest(), offset
        if offset:
            got.resumed_from.append(offset)
            say(f"resuming the copy at {mb(offset)} of {mb(total)}")
        else:
            part.start(validator, total)
        src.seek(offset)
        size = _write(_reads(src, source), part, offset, total, digest, got, head_check, part.path.name[:-len(".partial")],
                      progress)
    if size != total:
        raise _Interrupted(f"{source} changed size while being copied ({size} of {total} bytes)")
    return digest.hexdigest(), size


def _reads(src: Any, source: Path) -> Iterator[bytes]:
    while True:
        try:
            chunk = src.read(_CHUNK)
        except OSError as exc:
            raise _Interrupted(f"reading {source}: {exc.strerror or exc}") from None
        if not chunk:
            return
        yield chunk


def _install(partial: Path, dest: Path) -> None:
    """fsync the verified partial, rename it onto ``dest`` (atomic), fsync the folder."""
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, dest)
    fsync_dir(dest.parent)


def fetch(url: str, dest: Path, sha256: str, *, head_check: Callable[[bytes], None] | None = None,
          check: Callable[[Path], dict[str, Any]] | None = None, retries: int = 3, retry_delay: float = 1.0,
          progress: bool | None = None, client: Any = None) -> Fetched:
    """Download ``url`` to ``dest`` (see the module's docstring); ``PullError`` with a sentence when
    it cannot. ``check(path)`` inspects the verified file before it is renamed (``BadContent``
    to refuse it) and returns what it found."""
    started = time.monotonic()
    expected = sha256.lower()
    progress = sys.stderr.isatty() if progress is None else progress
    dest.parent.mkdir(parents=True, exist_ok=True)
    got = Fetched(path=dest, sha256=expected, size=0)
    if dest.exists():
        from models.integrity import sha256_file

        if sha256_file(dest) == expected:
            _Partial(dest, url, expected).discard()
            got.reused, got.size = True, dest.stat().st_size
            try:
                got.details = check(dest) if check else {}
            except BadContent as exc:
                raise BadContent(f"{dest} (already here, sha256 verified): {exc}") from None
            got.seconds = time.monotonic() - started
            return got
        say(f"{dest} exists with another sha256: downloading again (it is replaced only once the new file is verified)")
    part = _Partial(dest, url, expected)
    source = local_source(url)
    own_client = None
    if source is None and client is None:
        import httpx

        own_client = client = httpx.Client(follow_redirects=True, headers={"User-Agent": "understudy-models-pull"},
                                           timeout=httpx.Timeout(60.0, connect=15.0))
    try:
        attempts = restarts = 0
        fresh_after_mismatch = False
        delay = retry_delay
        while True:
            try:
                if source is not None:
                    digest, size = _file_once(source, part, got, head_check, progress)
                else:
                    digest, size = _http_once(client, url, part, got, head_check, progress)
            except _Restart as exc:
                restarts += 1
                got.restarts.append(str(exc))
                if restarts > MAX_RESTARTS:
                    raise PullError(f"{redact(url)}: gave up after {MAX_RESTARTS} restarts from zero (last: {exc})") from None
                say(f"{exc}: starting again from zero")
                continue
            except _Interrupted as exc:
                attempts += 1
                have = part.size()
                if attempts > retries:
                    kept = (f"the {mb(have)} received are kept in {part.path}: run the same command again to resume"
                            if have else "nothing was received")
                    raise PullError(f"the download of {redact(url)} was interrupted ({exc}); {kept}") from None
                say(f"interrupted ({exc}) with {mb(have)} here; resuming in {delay:g} s (retry {attempts} of {retries})")
                time.sleep(delay)
                delay = min(max(delay, 0.5) * 2, 30.0) if delay else 0.0
                continue
            except BadContent as exc:
                part.discard()
                raise BadContent(f"{redact(url)}: {exc}; nothing was kept") from None
            except OSError as exc:  # writing here: a full disk, a read-only folder
                raise PullError(f"cannot write {exc.filename or part.path}: {exc.strerror or exc} (what was received is "
                                f"kept in {part.path}: free space and run the same command again to resume)") from None
            if digest != expected:
                part.discard()
                if got.resumed_from and not fresh_after_mismatch:
                    fresh_after_mismatch = True
                    why = "the sha256 does not match after resuming (the earlier partial download may be stale)"
                    got.restarts.append(why)
                    say(f"{why}: downloading again from zero")
                    continue
                raise BadContent(f"{redact(url)}: sha256 mismatch: expected {expected}, the {size} bytes received hash to "
                                 f"{digest}. The download was deleted and nothing was written under {dest.name}: check the "
                                 "--sha256 value and the URL (a mirror serving another version, or an error page, gives this)")
            got.size = size
            break
        if check is not None:
            try:
                got.details = check(part.path)
            except BadContent as exc:
                part.discard()
                raise BadContent(f"{redact(url)}: {exc}. The file matches its sha256 but cannot be served; it was deleted "
                                 "and nothing was written under the model's name") from None
        _install(part.path, dest)
        part.meta_path.unlink(missing_ok=True)
    finally:
        if own_client is not None:
            own_client.close()
    got.seconds = time.monotonic() - started
    return got


# ---------------------------------------------------------------------------------------------
# Checks of a verified file


_GGUF_CHECK_TIMEOUT_S = 300.0


def check_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file this llama.cpp can load: header (``read_gguf``), a known architecture, and the
    vocabulary loaded by llama.cpp itself (in a subprocess: some malformed files abort)."""
    from models.gguf import GgufError, read_gguf

    try:
        info = read_gguf(path)
    except GgufError as exc:
        raise BadContent(str(exc).replace(str(path), "the file")) from None
    arch = info.architecture
    if not arch:
        raise BadContent("the GGUF header has no general.architecture: not a model llama.cpp can load")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "server.models_pull", "check-gguf", str(path), arch],
                              capture_output=True, text=True, timeout=_GGUF_CHECK_TIMEOUT_S, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise BadContent(f"llama.cpp took more than {_GGUF_CHECK_TIMEOUT_S:g} s to read the vocabulary") from None
    result: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            result.update(json.loads(line))
    version = result.get("llama_cpp", "?")
    known = result.get("architectures") or []
    if known and arch not in known:
        raise BadContent(f"it is a {arch!r} model, and this llama.cpp (llama-cpp-python {version}) does not know that "
                         f"architecture (it knows {len(known)}: {', '.join(sorted(known)[:12])}, ...): upgrade "
                         "llama-cpp-python, or pull a model of a known architecture")
    if proc.returncode != 0 or not result.get("loaded"):
        raise BadContent(f"llama.cpp (llama-cpp-python {version}) cannot load it: {_llama_reason(proc)}")
    context = info.arch_value("context_length")  # from the header: a vocab-only model has no hparams
    out = {"architecture": arch, "n_vocab": result.get("n_vocab"), "n_ctx_train": context,
           "architecture_list": "llama.cpp" if known else "unavailable (vocab-only load only)",
           "chat_template": "tokenizer.chat_template" in info.metadata}
    return out


def _llama_reason(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    for line in lines:
        m = re.search(r"error loading model:\s*(.+)", line)
        if m:
            return m.group(1)
    if proc.returncode < 0:
        return f"llama.cpp aborted (signal {-proc.returncode}) while reading it" + (f": {lines[-1]}" if lines else "")
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _check_gguf_main(path: str, arch: str) -> int:
    """In the subprocess: the architectures this llama.cpp knows, then a vocab-only load. One JSON
    line on stdout. Never asks a vocab-only model for its shape (llama.cpp aborts)."""
    import ctypes

    import llama_cpp

    out: dict[str, Any] = {"llama_cpp": llama_cpp.__version__}
    # llm_arch_name(llm_arch) is exported by libllama (C++ name); the enum runs from 0 to
    # LLM_ARCH_UNKNOWN, named "(unknown)". Any other value reads "unknown".
    fn = getattr(llama_cpp.llama_cpp._lib, "_Z13llm_arch_name8llm_arch", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_char_p
        names = []
        for i in range(4096):
            raw = fn(i)
            name = raw.decode("utf-8", "replace") if raw else ""
            if name == "(unknown)":
                out["architectures"] = names
                break
            if name and name != "unknown":
                names.append(name)
    if out.get("architectures") and arch not in out["architectures"]:
        print(json.dumps(out))
        return 0
    from models.llama_runner import LlamaModel  # installs llama-cpp-python's log callback: replaced here

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def log_to_stderr(level: int, text: bytes, user_data: Any) -> None:
        sys.stderr.write(text.decode("utf-8", "replace"))  # all of it: the parent picks the error line

    llama_cpp.llama_log_set(log_to_stderr, ctypes.c_void_p(0))
    print(json.dumps(out), flush=True)  # what is known so far, should the load abort
    model = LlamaModel(Path(path), vocab_only=True)
    out.update(loaded=True, n_vocab=model.n_vocab)
    print(json.dumps(out))
    return 0


def check_onnx(path: Path) -> dict[str, Any]:
    """An ONNX model onnxruntime can load, taking ``input_ids`` and ``attention_mask``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadContent(f"onnxruntime cannot load it: {first.replace(str(path), 'the file')}") from None
    inputs = [i.name for i in session.get_inputs()]
    missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
    if missing:
        raise BadContent(f"the ONNX model takes {', '.join(inputs) or 'no inputs'}; an embedding model must take input_ids "
                         "and attention_mask (and optionally token_type_ids)")
    shape = session.get_outputs()[0].shape
    return {"inputs": inputs, "dimensions": shape[-1] if shape and isinstance(shape[-1], int) else None}


def check_tokenizer(path: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises Exception
        raise BadContent(f"not a tokenizer.json the tokenizers library can read: {str(exc).strip()[:200]}") from None
    return {"vocabulary": tokenizer.get_vocab_size()}


# ---------------------------------------------------------------------------------------------
# The catalog file

CATALOG_HEADER = """\
# Models brought in by `understudy models pull`: `understudy serve` reads this file beside its config
# (`[server] models_file` names another). Each pull rewrites it, keeping the comment lines above each
# table. Tune a pulled model in your config (e.g. [models."<id>"] slots = 4): a key set in both files to
# different values is a configuration error.
"""
_HEADER_LINE = re.compile(r"^\[\s*models\s*\.\s*(.+?)\s*\]\s*(?:#.*)?$")


def _comments(text: str) -> dict[str, list[str]]:
    """The comment lines right above each ``[models.<id>]`` header, by id."""
    out: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        m = _HEADER_LINE.match(stripped)
        if m:
            with contextlib.suppress(tomllib.TOMLDecodeError):
                ids = list(tomllib.loads(f"[models.{m.group(1)}]\n")["models"])
                if len(ids) == 1:
                    out[ids[0]] = pending
            pending = []
        elif stripped.startswith("#"):
            pending.append(stripped)
        else:
            pending = []
    return out


def render_catalog(models: dict[str, dict[str, Any]], comments: dict[str, list[str]]) -> str:
    lines = [CATALOG_HEADER.rstrip("\n")]
    for model_id, table in models.items():
        lines += ["", *comments.get(model_id, []), f"[models.{toml_key(model_id)}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise PullError(f"{what} is in progress in another process (it holds {path}); wait for it to end") from None
        yield
    finally:
        os.close(fd)


def update_catalog(path: Path, model_id: str, entry: dict[str, Any] | None, comment: list[str] | None = None) -> None:
    """Add or replace (``entry``) or remove (None) the ``[models.<id>]`` table of the catalog file,
    keeping the other tables and the comment lines above them. Locked, written atomically."""
    with locked(path.with_name(path.name + ".lock"), "another change of the models file"):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PullError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
        models: dict[str, dict[str, Any]] = dict(data.get("models", {}))
        comments = _comments(text)
        if entry is None:
            models.pop(model_id, None)
        else:
            models[model_id] = entry
            if comment is not None:
                comments[model_id] = [c if c.startswith("#") else f"# {c}" for c in comment]
        body = render_catalog(models, comments)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with tmp.open("w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "check-gguf":
        sys.exit(_check_gguf_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m server.models_pull check-gguf PATH ARCHITECTURE (used by `understudy models pull`)",
          file=sys.stderr)
    sys.exit(2)
