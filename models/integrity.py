"""File integrity: sha256 of model files, checked before anything is loaded.

Called by ``models.registry`` at start-up (in the loading thread) and by ``understudy models list``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

from models.catalog import ModelSpec

_CHUNK = 4 * 1024 * 1024


class FileCheck(str, enum.Enum):
    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class IntegrityResult:
    check: FileCheck
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.check is FileCheck.OK


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path | None, expected: str, what: str, hint: str = "") -> IntegrityResult:
    if path is None or not path.is_file():
        where = str(path) if path is not None else "(package not installed)"
        tail = f"; {hint}" if hint else ""
        return IntegrityResult(FileCheck.MISSING, f"{what} file {where} is missing (expected sha256 {expected}){tail}")
    actual = sha256_file(path)
    if actual != expected.lower():
        return IntegrityResult(
            FileCheck.CORRUPT,
            f"{what} file {path} does not match its sha256: expected {expected}, found {actual}",
        )
    return IntegrityResult(FileCheck.OK)


def verify(spec: ModelSpec) -> IntegrityResult:
    """Check the model file and, for ONNX models, the tokenizer file."""
    result = check_file(spec.path, spec.sha256, f"model '{spec.id}'", spec.missing_hint)
    if not result.ok or spec.tokenizer_path is None:
        return result
    return check_file(spec.tokenizer_path, spec.tokenizer_sha256 or "", f"tokenizer of '{spec.id}'", spec.missing_hint)
