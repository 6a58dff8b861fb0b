"""Read a GGUF file's metadata (the key/value header) without loading the model.

Called by ``models.sizing`` when the hardware plan is made (at start, on the model-loader thread,
and by ``understudy hardware --plan``): the plan needs each chat model's shape (layers, heads,
embedding width, training context) before llama.cpp places a single weight. Pure Python, reads the
header only (a few MB at most: the tokenizer's vocabulary is the largest value), never the tensors.

Format (GGUF v2/v3, little-endian): ``b"GGUF"``, version ``u32``, tensor count ``u64``, key/value
count ``u64``, then per key: a string (``u64`` length + UTF-8), a value type ``u32`` and the value.
Raises ``GgufError`` with a sentence a user can act on for anything that is not such a file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hardware.tuning import LlmShape

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 * 1024 * 1024
_MAX_KEYS = 1_000_000


class GgufError(Exception):
    """Not a GGUF file, or one this reader cannot understand."""


@dataclass(frozen=True)
class GgufInfo:
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    """Scalars and strings as Python values; arrays of scalars as lists; string arrays as their length."""

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GgufError("the file ends inside its GGUF header (truncated download?)")
    return data


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    if n > _MAX_STRING:
        raise GgufError(f"a GGUF string of {n} bytes: the header is corrupt")
    return _read(f, n).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item == _STRING:  # the vocabulary: skip the strings, keep the count
            for _ in range(count):
                f.seek(_unpack(f, "<Q"), 1)
            return count
        if item not in _SCALARS:
            raise GgufError(f"unknown GGUF array item type {item}")
        fmt = _SCALARS[item]
        size = struct.calcsize(fmt)
        if count > 4096:  # token types, scores, merges: skip, keep the count
            f.seek(count * size, 1)
            return count
        return list(struct.unpack("<" + fmt[1:] * count, _read(f, size * count)))
    raise GgufError(f"unknown GGUF value type {kind}")


def read_gguf(path: Path) -> GgufInfo:
    try:
        return _read_gguf(path)
    except (OverflowError, ValueError, struct.error) as exc:  # a corrupt length or seek
        raise GgufError(f"{path} has a corrupt GGUF header ({type(exc).__name__})") from None


def _read_gguf(path: Path) -> GgufInfo:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GgufError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise GgufError(f"{path} is GGUF version {version}; this reader knows versions 2 and 3")
        tensors, keys = _unpack(f, "<Q"), _unpack(f, "<Q")
        if keys > _MAX_KEYS:
            raise GgufError(f"{path} claims {keys} metadata keys: the header is corrupt")
        meta: dict[str, Any] = {}
        for _ in range(keys):
            key = _string(f)
            meta[key] = _value(f, _unpack(f, "<I"))
    return GgufInfo(version, tensors, meta)


def _first(value: Any) -> int | None:
    """Per-layer arrays (some models vary heads by layer): the largest, which sizes the KV cache safely."""
    try:
        if isinstance(value, list):
            return max(int(v) for v in value) if value else None
        return None if value is None else int(value)
    except (TypeError, ValueError):
        raise GgufError(f"a GGUF shape value is not a number: {type(value).__name__}") from None


def llm_shape(path: Path, info: GgufInfo | None = None) -> LlmShape:
    """The shape the plan sizes a chat model by; ``GgufError`` when a key it needs is missing."""
    info = info or read_gguf(path)
    arch = info.architecture
    if not arch:
        raise GgufError(f"{path} has no general.architecture: not a model llama.cpp can load")
    values = {
        "n_layer": _first(info.arch_value("block_count")),
        "n_embd": _first(info.arch_value("embedding_length")),
        "n_head": _first(info.arch_value("attention.head_count")),
        "n_ctx_train": _first(info.arch_value("context_length")),
    }
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise GgufError(f"{path} ({arch}) lacks {', '.join(missing)} in its metadata")
    head_kv = _first(info.arch_value("attention.head_count_kv")) or values["n_head"]
    return LlmShape(file_bytes=path.stat().st_size, n_head_kv=head_kv, key_length=_first(info.arch_value("attention.key_length")),
                    value_length=_first(info.arch_value("attention.value_length")), **values)  # type: ignore[arg-type]
