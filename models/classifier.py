"""The ``classifier`` catalog kind: a calibrated head over an embedding model, a red-flag net,
and checks that make it abstain rather than guess.

Who calls what:
- ``read_examples`` (config parsing, at start, and the evaluation script): the examples file,
  with every problem reported as ``ExamplesError`` naming the line.
- ``train_head`` / ``Head.load`` (the model-loading thread, ``models.registry``): the head is
  trained once per (embedding model, examples, settings) and cached as ``.npz`` under
  ``<state_dir>/classifiers/`` (plain arrays, no pickle), so a restart does not retrain.
- ``Classifier.classify`` (event-loop thread, through ``models.client.LocalClient``): cuts long
  texts into chunks, awaits their embeddings from the embedding engine (one submission, at the
  caller's priority), and decides on the event loop: a few hundred microseconds of numpy per text.

The head: multinomial logistic regression over ``[embedding × EMBEDDING_WEIGHT ; TF-IDF word
1-2-grams ; TF-IDF char 2-5-grams]`` (``models.lexical``), class-balanced, ``C = 16``, then one
temperature fitted on 5-fold out-of-fold logits (so the probabilities are calibrated, not
over-confident). The feature set, the weight and ``C`` were chosen by cross-validation on the
training split of the shipped examples, never on the held-out split.

A decision, per text:
1. **Unsupported input**: a language other than the configured one (py3langid, probability
   ≥ 0.6; checked for texts whose best cosine to a training example is below 0.55, since text
   that close to the English examples is English), text with no linguistic content
   (py3langid's ``zxx``, or no letters), or a text
   unlike anything it was trained on (its best cosine to a training example below the head's
   ``unfamiliar_below``, the 1st percentile of the training set's own nearest neighbours minus
   0.05) → abstain.
2. **Chunks**: a text longer than the embedding model's limit is split at sentence boundaries;
   each chunk is classified and the text takes the most urgent chunk's decision.
3. **Label**: the most probable label, except that a probability of the red-flag label of at
   least ``escalate_at`` is enough for that label (a missed emergency costs more than an
   over-triaged one). Its probability below ``abstain_below`` → abstain (unless escalated).
4. **Red flags** (``models.redflags``): a phrase that fires forces ``red_flag_label`` when it is
   more urgent than the decision, and overrides an abstention; it never lowers a label.
An abstention's label is ``needs_human_review``; its scores are still reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.catalog import ClassifierSpec
from models.lexical import LexicalFeatures
from models.redflags import RedFlagNet
from models.textsplit import chunks as split_chunks

log = logging.getLogger("understudy.classifier")

ABSTAIN_LABEL = "needs_human_review"
HEAD_VERSION = 1
EMBEDDING_WEIGHT = 0.5
C = 16.0
_LANG_MIN_PROB = 0.6
LANGUAGE_CHECK_BELOW = 0.55
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_EXAMPLES_BYTES = 64 * 1024 * 1024


class ExamplesError(ValueError):
    """The examples file cannot train a classifier; the message names the line and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    split: str  # "train" or "heldout"


def valid_label(label: str) -> bool:
    return bool(_LABEL_RE.match(label)) and label != ABSTAIN_LABEL


def read_examples(path: Path, labels: tuple[str, ...]) -> list[Example]:
    """Parse and check an examples file (JSONL: ``text``, ``label``, optional ``split``)."""
    try:
        if path.stat().st_size > MAX_EXAMPLES_BYTES:
            raise ExamplesError(f"{path} is larger than {MAX_EXAMPLES_BYTES // (1024 * 1024)} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise ExamplesError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ExamplesError(f"{path} is not UTF-8 text") from None
    out: list[Example] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ExamplesError(f"{where}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise ExamplesError(f"{where}: not a JSON object")
        unknown = set(obj) - {"text", "label", "split"}
        if unknown:
            raise ExamplesError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: text, label, split)")
        item_text, label, split = obj.get("text"), obj.get("label"), obj.get("split", "train")
        if not isinstance(item_text, str) or not item_text.strip():
            raise ExamplesError(f"{where}: 'text' must be a non-empty string")
        if not isinstance(label, str):
            raise ExamplesError(f"{where}: 'label' must be a string")
        if label not in labels:
            raise ExamplesError(f"{where}: label {label!r} is not in the configured labels ({', '.join(labels)})")
        if split not in ("train", "heldout"):
            raise ExamplesError(f"{where}: 'split' must be 'train' or 'heldout', got {split!r}")
        out.append(Example(item_text, label, split))
    train = [e for e in out if e.split == "train"]
    present = {e.label for e in train}
    if len(present) < 2:
        raise ExamplesError(f"{path}: the training examples have {len(present)} label(s); a classifier needs at least 2")
    for label in labels:
        count = sum(1 for e in train if e.label == label)
        if count < 5:
            raise ExamplesError(f"{path}: label {label!r} has {count} training examples; each configured label needs at least 5")
    return out


def cache_key(spec: ClassifierSpec, embedding_sha256: str, tokenizer_sha256: str | None) -> str:
    settings = {"version": HEAD_VERSION, "embedding": embedding_sha256, "tokenizer": tokenizer_sha256,
                "examples": spec.examples_sha256, "labels": list(spec.labels), "seed": spec.seed,
                "embedding_weight": EMBEDDING_WEIGHT, "C": C}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# -- the head ------------------------------------------------------------------------------------
@dataclass
class Head:
    labels: tuple[str, ...]
    coef: np.ndarray          # [labels, dims + lexical]
    intercept: np.ndarray     # [labels]
    temperature: float
    lexical: LexicalFeatures
    train_vectors: np.ndarray  # [n, dims] float16, normalised: the nearest-neighbour check
    unfamiliar_below: float
    num_examples: int
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            digest = hashlib.sha256()
            for array in (self.coef, self.intercept, np.array([self.temperature]), self.train_vectors):
                digest.update(np.ascontiguousarray(array).tobytes())
            self.sha256 = digest.hexdigest()
        self._dims = self.train_vectors.shape[1]
        self._emb_coef = np.ascontiguousarray(self.coef[:, : self._dims].T * EMBEDDING_WEIGHT)  # [dims, labels]
        self._lex_coef = np.ascontiguousarray(self.coef[:, self._dims:].T)  # [lexical, labels]
        self._train = self.train_vectors.astype(np.float32)

    def probabilities(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        logits = vectors @ self._emb_coef + self.intercept
        for i, text in enumerate(texts):
            cols, vals = self.lexical.row(text)
            if cols.size:
                logits[i] += vals @ self._lex_coef[cols]
        logits = logits / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def nearest(self, vectors: np.ndarray) -> np.ndarray:
        """Best cosine of each vector to a training example."""
        return (vectors @ self._train.T).max(axis=1)

    def save(self, path: Path) -> None:
        arrays = {"labels": np.array(self.labels, dtype=str), "coef": self.coef, "intercept": self.intercept,
                  "temperature": np.array([self.temperature]), "train_vectors": self.train_vectors,
                  "unfamiliar_below": np.array([self.unfamiliar_below]), "num_examples": np.array([self.num_examples]),
                  **self.lexical.to_arrays("lex_")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)  # never a half-written file under the final name

    @classmethod
    def load(cls, path: Path) -> "Head":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(
            labels=tuple(str(x) for x in arrays["labels"]), coef=arrays["coef"], intercept=arrays["intercept"],
            temperature=float(arrays["temperature"][0]), lexical=LexicalFeatures.from_arrays(arrays, "lex_"),
            train_vectors=arrays["train_vectors"], unfamiliar_below=float(arrays["unfamiliar_below"][0]),
            num_examples=int(arrays["num_examples"][0]),
        )


def train_head(texts: list[str], labels: list[str], vectors: np.ndarray, label_order: tuple[str, ...], seed: int) -> Head:
    """Fit the head (seconds on a few hundred examples). ``vectors`` are the texts' embeddings."""
    from scipy.optimize import minimize_scalar
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.array([label_order.index(label) for label in labels])

    def features(lexical: LexicalFeatures, idx: np.ndarray) -> Any:
        return hstack([csr_matrix(vectors[idx] * EMBEDDING_WEIGHT), lexical.matrix([texts[i] for i in idx])]).tocsr()

    def fit(idx: np.ndarray) -> tuple[LexicalFeatures, Any]:
        lexical = LexicalFeatures.fit([texts[i] for i in idx])
        model = LogisticRegression(C=C, max_iter=5000, class_weight="balanced", random_state=seed)
        return lexical, model.fit(features(lexical, idx), y[idx])

    # Out-of-fold logits for the temperature (a fold never sees its own examples).
    folds = min(5, int(np.bincount(y).min()))
    oof = np.zeros((len(texts), len(label_order)))
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, y):
        lexical, model = fit(train_idx)
        oof[test_idx] = model.decision_function(features(lexical, test_idx))

    def nll(t: float) -> float:
        z = oof / t
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

    temperature = float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)
    lexical, model = fit(np.arange(len(texts)))
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1.0)
    unfamiliar_below = float(np.percentile(sims.max(axis=1), 1) - 0.05)
    return Head(tuple(label_order), model.coef_.astype(np.float64), model.intercept_.astype(np.float64), temperature,
                lexical, vectors.astype(np.float16), unfamiliar_below, len(texts))


# -- the language / content check ----------------------------------------------------------------
class LanguageCheck:
    """Is this text in the language the examples are in, and is it language at all?"""

    def __init__(self, language: str) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.language = language
        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def problem(self, text: str) -> str | None:
        """None when fine, else why the classifier should not answer."""
        if not any(c.isalpha() for c in text):
            return "no_text"
        lang, prob = self._identifier.classify(text)
        if lang == "zxx":
            return "no_text"
        if lang != self.language and prob >= _LANG_MIN_PROB and len(text.split()) >= 3:
            return f"unsupported_language:{lang}"
        return None


# -- the runtime -----------------------------------------------------------------------------------
@dataclass
class Classification:
    label: str
    confidence: float
    scores: dict[str, float]
    abstained: bool
    red_flags: list[str] = field(default_factory=list)
    reason: str | None = None
    """Why it abstained (``low_confidence``, ``unfamiliar``, ``no_text``, ``unsupported_language:xx``)
    or why the label was raised (``red_flag``, ``escalated``); None for a plain decision."""
    chunks: int = 1

    def as_dict(self, index: int) -> dict[str, Any]:
        return {"index": index, "label": self.label, "confidence": round(self.confidence, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()}, "abstained": self.abstained,
                "red_flags": self.red_flags, "reason": self.reason, "chunks": self.chunks}


@dataclass
class Classified:
    results: list[Classification]
    tokens: int
    """Tokens the embedding model read (usage)."""


Embed = Callable[[list[str], int], Awaitable[tuple[np.ndarray, int]]]
Count = Callable[[list[str]], list[int]]


class Classifier:
    """One loaded classifier. ``classify`` runs on the event loop; everything else is fixed at load."""

    def __init__(self, spec: ClassifierSpec, head: Head, net: RedFlagNet, language: LanguageCheck,
                 embed: Embed, count_tokens: Count, max_tokens: int, examples_sha256: str) -> None:
        if head.labels != spec.labels:
            raise ValueError(f"the cached head has labels {head.labels}, the config {spec.labels}")
        self.spec = spec
        self.head = head
        self.net = net
        self.language = language
        self._embed = embed
        self._count = count_tokens
        self._max_tokens = max_tokens
        self._urgent = spec.labels.index(spec.red_flag_label)
        self.provenance = {"head": head.sha256, "examples": examples_sha256, "red_flags": net.sha256}
        self.stats = {"requests": 0, "texts": 0, "chunks": 0, "abstained": 0, "red_flags": 0}

    def status(self) -> dict[str, Any]:
        return {**self.stats, **{f"{k}_sha256": v for k, v in self.provenance.items()}}

    def stop(self) -> None:
        """Nothing to stop: the classifier owns no thread (its embedding engine does)."""

    def split(self, text: str) -> list[str]:
        """The pieces of ``text`` the embedding model accepts whole (one, for most messages)."""
        if len(text) < self._max_tokens:  # a token is at least one character
            return [text]
        return [s.text for s in split_chunks(text, self._max_tokens, self._count)] or [text]

    async def classify(self, texts: list[str], priority: int) -> Classified:
        started = time.perf_counter()
        pieces = [self.split(t) for t in texts]
        flat = [p for ps in pieces for p in ps]
        vectors, tokens = await self._embed(flat, priority)
        probs = self.head.probabilities(vectors, flat)
        nearest = self.head.nearest(vectors)
        out: list[Classification] = []
        at = 0
        for text, ps in zip(texts, pieces):
            n = len(ps)
            out.append(self._decide(text, probs[at:at + n], nearest[at:at + n]))
            at += n
        stats = self.stats
        stats["requests"] += 1
        stats["texts"] += len(texts)
        stats["chunks"] += len(flat)
        stats["abstained"] += sum(1 for c in out if c.abstained)
        stats["red_flags"] += sum(1 for c in out if c.red_flags)
        log.debug("classified %d texts (%d chunks) in %.1f ms", len(texts), len(flat), (time.perf_counter() - started) * 1000)
        return Classified(out, tokens)

    def _decide(self, text: str, probs: np.ndarray, nearest: np.ndarray) -> Classification:
        spec, labels = self.spec, self.spec.labels
        decisions = []
        for p in probs:
            top = int(p.argmax())
            escalated = top > self._urgent and p[self._urgent] >= spec.escalate_at
            label = self._urgent if escalated else top
            decisions.append((label, -float(p[label]), escalated))
        best = min(range(len(decisions)), key=lambda i: decisions[i][:2])  # most urgent, then most confident
        label, neg_conf, escalated = decisions[best]
        confidence = -neg_conf
        scores = {name: float(v) for name, v in zip(labels, probs[best])}
        reason: str | None = "escalated" if escalated else None
        closest = float(nearest.max())
        # Language identification (about 0.1 ms of Python) only for texts not already close to
        # the training examples: MiniLM is an English model, and text in another language lands
        # far from every English example (a Spanish chest-pain message: 0.35; held-out English
        # messages: 0.45 at their 5th percentile).
        abstain = self.language.problem(text) if closest < LANGUAGE_CHECK_BELOW else None
        if abstain is None and closest < self.head.unfamiliar_below:
            abstain = "unfamiliar"
        if abstain is None and not escalated and confidence < spec.abstain_below:
            abstain = "low_confidence"
        flags = [hit.phrase for hit in self.net.check(text)]
        if flags and (abstain is not None or label > self._urgent):
            return Classification(spec.red_flag_label, confidence if label == self._urgent else scores[spec.red_flag_label],
                                  scores, False, flags, "red_flag", len(probs))
        if abstain is not None:
            return Classification(ABSTAIN_LABEL, confidence, scores, True, flags, abstain, len(probs))
        return Classification(labels[label], confidence, scores, False, flags, reason, len(probs))
