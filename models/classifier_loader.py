"""Loading a classifier: the cached head, or training it (model-loading thread, at start).

Called by ``models.registry`` once the classifier's embedding model is READY. The training
examples are embedded through that model's own engine (at ``BACKGROUND`` priority, so a model
that is still training never delays a client of the embedding model), from this thread, by
handing the coroutine to the event loop and waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.catalog import ModelSpec
from models.classifier import Classifier, Head, LanguageCheck, cache_key, read_examples, train_head
from models.client import drain
from models.priority import Priority
from models.redflags import RedFlagNet

log = logging.getLogger("understudy.classifier")


def load_classifier(spec: ModelSpec, embedding: ModelSpec, engine: Any, cache_dir: Path,
                    loop: asyncio.AbstractEventLoop) -> tuple[Classifier, dict[str, Any]]:
    cs = spec.classifier
    assert cs is not None

    async def embed(texts: list[str], priority: int) -> tuple[np.ndarray, int]:
        final = await drain(engine.submit(texts, priority))
        return final.payload, final.prompt_tokens

    net = RedFlagNet(cs.red_flags)
    language = LanguageCheck(cs.language)
    key = cache_key(cs, embedding.sha256, embedding.tokenizer_sha256)
    path = cache_dir / f"{spec.id}-{key[:24]}.npz"
    head = _cached(path)
    trained = head is None
    started = time.monotonic()
    if head is None:
        train = [e for e in read_examples(spec.path, cs.labels) if e.split == "train"]  # type: ignore[arg-type]
        texts = [e.text for e in train]
        vectors = asyncio.run_coroutine_threadsafe(_embed_examples(texts, embed, engine), loop).result()
        embedded_s = time.monotonic() - started
        head = train_head(texts, [e.label for e in train], vectors, cs.labels, cs.seed)
        head.save(path)
        log.info("classifier %s: trained on %d examples in %.1f s (embeddings %.1f s, head %.1f s); cached at %s",
                 spec.id, len(train), time.monotonic() - started, embedded_s, time.monotonic() - started - embedded_s, path)
    else:
        log.info("classifier %s: head loaded from %s (%d examples)", spec.id, path, head.num_examples)
    classifier = Classifier(cs, head, net, language, embed, engine.count_tokens, engine.max_length, spec.sha256)
    settings = {
        "embedding_model": cs.embedding_model, "labels": list(cs.labels), "red_flag_label": cs.red_flag_label,
        "abstain_below": cs.abstain_below, "escalate_at": cs.escalate_at, "language": cs.language,
        "unfamiliar_below": round(head.unfamiliar_below, 4), "temperature": round(head.temperature, 4),
        "examples": head.num_examples, "red_flags": len(cs.red_flags), "red_flags_source": cs.red_flags_source,
        "head_sha256": head.sha256, "examples_sha256": spec.sha256, "red_flags_sha256": net.sha256,
        "trained_at_start": trained, "cache": str(path),
    }
    return classifier, settings


def _cached(path: Path) -> Head | None:
    if not path.is_file():
        return None
    try:
        return Head.load(path)
    except Exception as exc:  # a damaged cache file is retrained, never trusted
        log.warning("classifier cache %s is unreadable (%s); retraining", path, type(exc).__name__)
        return None


async def _embed_examples(texts: list[str], embed: Any, engine: Any) -> np.ndarray:
    """One vector per example; an example longer than the model's limit is the normalised mean
    of its chunks' vectors (a head trained on chunks would not see the whole message)."""
    from models.textsplit import chunks

    limit = engine.max_length
    pieces = [[c.text for c in chunks(t, limit, engine.count_tokens)] or [t] if len(t) >= limit else [t] for t in texts]
    flat = [p for ps in pieces for p in ps]
    # Submitted shortest first: batches are padded to their longest input.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    sorted_vectors, _ = await embed([flat[i] for i in order], Priority.BACKGROUND)
    vectors = np.empty_like(sorted_vectors)
    vectors[order] = sorted_vectors
    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    at = 0
    for i, ps in enumerate(pieces):
        v = vectors[at:at + len(ps)].mean(axis=0)
        out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        at += len(ps)
    return out
