"""Config parsing of ``kind = "classifier"`` models (``[models.<id>]``), for ``server.config``.

Keys (see the README, "Workloads"): ``embedding_model``, ``examples`` + ``examples_sha256``,
``labels`` (most urgent first), ``red_flags`` (a list) or ``red_flags_file``, ``red_flag_label``,
``abstain_below``, ``escalate_at``, ``language``, ``seed``. An override of an embedded
classifier inherits what it does not set.

The examples file is read here, at start, so that a malformed line, a label missing from
``labels`` or a file with a single label stops the server with exit status 2 and a message
naming the problem (its sha256 is checked later, with the models: a mismatch makes the model
unavailable, like any model file).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from models.catalog import ClassifierSpec, EngineOptions, ModelFormat, ModelKind, ModelSpec
from models.classifier import ExamplesError, read_examples, valid_label
from models.redflags import RedFlagNet, parse_phrases

KEYS = {"kind", "embedding_model", "examples", "examples_sha256", "labels", "red_flags", "red_flags_file",
        "red_flag_label", "abstain_below", "escalate_at", "language", "seed"}


def parse_classifier(model_id: str, table: dict[str, Any], base: Path, inherited: ModelSpec | None,
                     specs: dict[str, ModelSpec]) -> ModelSpec:
    from server.config import ConfigError, _no_unknown, _path, _take

    where = f"models.{model_id}"
    _no_unknown(table, KEYS, where)
    old = inherited.classifier if inherited is not None else None
    required = old is None

    def text_list(key: str) -> tuple[str, ...] | None:
        value = _take(table, key, list, where)
        if value is None:
            return None
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{where}.{key}", "must be a non-empty list of non-empty strings")
        return tuple(v.strip() for v in value)

    embedding = _take(table, "embedding_model", str, where, old.embedding_model if old else None, required=required)
    emb_spec = specs.get(embedding)
    if emb_spec is None or emb_spec.kind is not ModelKind.EMBEDDING:
        raise ConfigError(f"{where}.embedding_model", f"no embedding model {embedding!r} in the catalog")
    examples_raw = _take(table, "examples", str, where, required=required)
    examples = _path(examples_raw, base) if examples_raw is not None else old.examples_path  # type: ignore[union-attr]
    sha = _take(table, "examples_sha256", str, where, required=examples_raw is not None)
    sha = sha if sha is not None else old.examples_sha256  # type: ignore[union-attr]
    if len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
        raise ConfigError(f"{where}.examples_sha256", "must be 64 hexadecimal characters")
    labels = text_list("labels") or (old.labels if old else None)
    if labels is None:
        raise ConfigError(f"{where}.labels", "required (most urgent first)")
    bad = next((lab for lab in labels if not valid_label(lab)), None)
    if bad is not None:
        raise ConfigError(f"{where}.labels", f"{bad!r} is not a valid label (lowercase letters, digits, - and _; "
                          "'needs_human_review' is reserved)")
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ConfigError(f"{where}.labels", "needs at least two distinct labels")
    red_label = _take(table, "red_flag_label", str, where, old.red_flag_label if old and old.red_flag_label in labels else labels[0])
    if red_label not in labels:
        raise ConfigError(f"{where}.red_flag_label", f"{red_label!r} is not one of the labels ({', '.join(labels)})")
    phrases, source = _red_flags(table, where, base, old)
    try:
        RedFlagNet(phrases)
    except ValueError as exc:
        raise ConfigError(f"{where}.red_flags", str(exc)) from None
    floats = {}
    for key in ("abstain_below", "escalate_at"):
        value = _take(table, key, float, where)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}.{key}", f"must be between 0 and 1, got {value}")
        if value is not None:
            floats[key] = value
    seed = _take(table, "seed", int, where, old.seed if old else 0)
    language = _take(table, "language", str, where, old.language if old else "en")
    spec = ClassifierSpec(embedding_model=embedding, examples_path=examples, examples_sha256=sha.lower(), labels=labels,
                          red_flags=phrases, red_flags_source=source, red_flag_label=red_label, seed=seed, language=language)
    if old is not None:
        floats = {"abstain_below": old.abstain_below, "escalate_at": old.escalate_at, **floats}
    spec = replace(spec, **floats)
    try:
        read_examples(examples, labels)
    except ExamplesError as exc:
        raise ConfigError(f"{where}.examples", str(exc)) from None
    return ModelSpec(
        id=model_id, kind=ModelKind.CLASSIFIER, format=ModelFormat.HEAD, path=examples, sha256=spec.examples_sha256,
        options=EngineOptions(), source="config" if inherited is None else "embedded (overridden)", classifier=spec,
        missing_hint=inherited.missing_hint if inherited is not None and examples_raw is None else "",
    )


def _red_flags(table: dict[str, Any], where: str, base: Path, old: ClassifierSpec | None) -> tuple[tuple[str, ...], str]:
    from server.config import ConfigError, _path, _take

    inline = _take(table, "red_flags", list, where)
    file_raw = _take(table, "red_flags_file", str, where)
    if inline is not None and file_raw is not None:
        raise ConfigError(f"{where}.red_flags", "give red_flags or red_flags_file, not both")
    if inline is not None:
        if not all(isinstance(v, str) for v in inline):
            raise ConfigError(f"{where}.red_flags", "must be a list of phrases")
        phrases = parse_phrases("\n".join(inline))
        if not phrases:
            raise ConfigError(f"{where}.red_flags", "is empty (a classifier needs a red-flag list)")
        return phrases, "config"
    if file_raw is not None:
        path = _path(file_raw, base)
        try:
            phrases = parse_phrases(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.red_flags_file", f"cannot read {path}: {exc}") from None
        if not phrases:
            raise ConfigError(f"{where}.red_flags_file", f"{path} has no phrases")
        return phrases, str(path)
    if old is not None:
        return old.red_flags, old.red_flags_source
    raise ConfigError(f"{where}.red_flags_file", "required (or red_flags): a classifier needs a red-flag list")
