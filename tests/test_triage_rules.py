"""Triage's pure parts, without a model: the red-flag net, the decision rule, long-text chunks,
the examples file checks, the output template, and the evaluation metrics."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from models.catalog import TRIAGE_DATA, TRIAGE_EXAMPLES_SHA256, TRIAGE_LABELS, ClassifierSpec
from models.classifier import ABSTAIN_LABEL, Classification, Classifier, ExamplesError, Head, LanguageCheck, read_examples
from models.integrity import sha256_file
from models.lexical import Block, LexicalFeatures
from models.redflags import RedFlagNet, load_phrases
from models.textsplit import chunks, sentences
from server.workloads.triage import check_template, render
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from eval_workloads import triage_metrics  # noqa: E402

NET = RedFlagNet(load_phrases(TRIAGE_DATA / "red_flags.txt"))


def flags(text: str) -> list[str]:
    return [h.phrase for h in NET.check(text)]


@pytest.mark.parametrize("text", [
    "I have chest pain since this morning",
    "No fever, chest pain since this morning",          # the negation ends at the comma
    "her face is drooping and her speech is slurred",
    "I can’t breathe",                                  # typographic apostrophe
    "I cant breathe",                                   # none at all
    "took the whole bottle of tylenol",
    "not sure but I think his face looks droopy",       # uncertainty is not a negation
    "She is not breathing!",                            # the phrase itself says "not"
    "our 5 weeks old has a temp of 38.2",
])
def test_red_flags_fire(text: str) -> None:
    assert flags(text), text


@pytest.mark.parametrize("text", [
    "no chest pain, just a cough",
    "Denies chest pain or shortness of breath",
    "not having any trouble breathing, just a runny nose",
    "my dad had a stroke 10 years ago, should I check my bp",
    "hx of chest pain, here for a refill",
    "I'm not suicidal, just feeling flat lately",
    "my wife is 12 weeks pregnant, no bleeding, asking about vitamins",  # negation inside a '...' gap
    "chest pain 3 years ago, fine since",
])
def test_negated_and_historical_mentions_do_not_fire(text: str) -> None:
    assert flags(text) == [], text


def test_the_red_flag_list_is_hashed_for_provenance() -> None:
    assert NET.sha256 == RedFlagNet(load_phrases(TRIAGE_DATA / "red_flags.txt")).sha256
    assert RedFlagNet(("chest pain",)).sha256 != NET.sha256


# -- the decision rule, with a head whose scores we choose -----------------------------------------
def _head(scores: list[float], train: np.ndarray) -> Head:
    empty = LexicalFeatures(Block({}, np.zeros(0), "word"), Block({}, np.zeros(0), "char"))
    logits = np.log(np.asarray(scores))
    return Head(TRIAGE_LABELS, np.zeros((4, train.shape[1])), logits, 1.0, empty, train.astype(np.float16), 0.3, len(train))


def _classifier(scores: list[float], red_flag_label: str = "emergent", labels: tuple[str, ...] = TRIAGE_LABELS,
                abstain_below: float = 0.5, vector: np.ndarray | None = None) -> Classifier:
    train = np.eye(4, 8, dtype=np.float32)
    head = _head(scores, train)
    head.labels = labels
    spec = ClassifierSpec("emb", Path("x"), "0" * 64, labels, NET.phrases, "test", red_flag_label, abstain_below=abstain_below)
    vec = train[:1] if vector is None else vector

    async def embed(texts: list[str], priority: int) -> tuple[np.ndarray, int]:
        return np.repeat(vec, len(texts), axis=0), 3 * len(texts)

    return Classifier(spec, head, NET, LanguageCheck("en"), embed, lambda ts: [len(t.split()) + 2 for t in ts], 256, "0" * 64)


def classify(c: Classifier, text: str) -> Classification:
    return asyncio.run(c.classify([text], 1)).results[0]


def test_a_red_flag_raises_a_lower_label() -> None:
    c = _classifier([0.05, 0.05, 0.85, 0.05])  # the head says routine
    out = classify(c, "I have had crushing chest pain for an hour")
    assert out.label == "emergent" and out.red_flags and out.reason == "red_flag" and not out.abstained


def test_a_red_flag_never_lowers_a_label() -> None:
    # The red-flag label is 'urgent' here; the head says 'emergent', which must stay.
    c = _classifier([0.9, 0.04, 0.03, 0.03], red_flag_label="urgent")
    out = classify(c, "I have had chest pain for an hour")
    assert out.label == "emergent" and out.red_flags == ["chest pain"]


def test_low_confidence_abstains_but_a_red_flag_overrides_it() -> None:
    c = _classifier([0.2, 0.3, 0.3, 0.2])
    out = classify(c, "my knee has been a bit stiff in the mornings")
    assert out.abstained and out.label == ABSTAIN_LABEL and out.reason == "low_confidence"
    assert set(out.scores) == set(TRIAGE_LABELS)
    out = classify(c, "my husband is slurring his words and his face is drooping")
    assert not out.abstained and out.label == "emergent"


def test_probability_of_the_urgent_label_escalates() -> None:
    c = _classifier([0.4, 0.05, 0.5, 0.05])  # routine is likelier, but emergent reaches escalate_at
    out = classify(c, "my knee has been a bit stiff in the mornings")
    assert out.label == "emergent" and out.reason == "escalated"


def _at_cosine(cos: float) -> np.ndarray:
    """A vector at cosine ``cos`` to the nearest training example (the stub's are the axes 0-3)."""
    v = np.zeros((1, 8), dtype=np.float32)
    v[0, 0], v[0, 7] = cos, (1 - cos**2) ** 0.5
    return v


def test_another_language_and_gibberish_abstain() -> None:
    # MiniLM puts text in another language far from every English example (cosine <= 0.40 for
    # the twelve languages tried); only such texts go through language identification.
    c = _classifier([0.9, 0.04, 0.03, 0.03], vector=_at_cosine(0.4))
    out = classify(c, "Mi madre tiene mucho dolor en el pecho desde esta mañana y no puede respirar bien")
    assert out.abstained and out.reason == "unsupported_language:es"
    assert classify(c, "?? !!! 12345").reason == "no_text"
    assert classify(c, "asdkjh qwpoeiru zxcmvn").abstained


def test_text_close_to_the_examples_skips_language_identification() -> None:
    # py3langid reads this clipped nurse-line English as "no linguistic content" (zxx).
    text = "pt 67m hx dm htn c/o cp"
    assert classify(_classifier([0.9, 0.04, 0.03, 0.03], vector=_at_cosine(0.4)), text).reason == "no_text"
    # Close to the examples (as real messages like it are), it is classified, not refused.
    out = classify(_classifier([0.9, 0.04, 0.03, 0.03], vector=_at_cosine(0.9)), text)
    assert out.label == "emergent" and not out.abstained


def test_text_unlike_the_training_set_abstains() -> None:
    far = np.zeros((1, 8), dtype=np.float32)
    far[0, 7] = 1.0  # orthogonal to every training vector
    out = classify(_classifier([0.9, 0.04, 0.03, 0.03], vector=far), "What is the capital of France?")
    assert out.abstained and out.reason == "unfamiliar"


def test_a_long_message_takes_its_most_urgent_chunk() -> None:
    c = _classifier([0.05, 0.05, 0.85, 0.05])
    text = " ".join(["I wanted to ask about my repeat prescription and the parking permit."] * 60)
    text += " And since an hour ago I cannot breathe."
    out = classify(c, text)
    assert out.chunks > 1 and out.label == "emergent"


def test_chunks_respect_the_limit_and_sentence_boundaries() -> None:
    count = lambda texts: [len(t.split()) + 2 for t in texts]  # noqa: E731
    text = "One two three. Four five six seven. Eight nine.\nTen eleven twelve thirteen fourteen fifteen sixteen."
    pieces = chunks(text, 7, count)
    assert all(count([p.text])[0] <= 7 for p in pieces)
    assert [p.text for p in pieces][0] == "One two three."
    assert all(text[p.start:p.end] == p.text for p in pieces)
    assert [s.text for s in sentences("A b. C d!  E f?\nG")] == ["A b.", "C d!", "E f?", "G"]


# -- examples file --------------------------------------------------------------------------------
def test_the_shipped_examples_match_their_pinned_hash_and_split() -> None:
    path = TRIAGE_DATA / "examples.jsonl"
    assert sha256_file(path) == TRIAGE_EXAMPLES_SHA256
    examples = read_examples(path, TRIAGE_LABELS)
    train = [e for e in examples if e.split == "train"]
    heldout = [e for e in examples if e.split == "heldout"]
    assert len(train) >= 600 and len(heldout) >= 150
    assert not {e.text for e in train} & {e.text for e in heldout}


@pytest.mark.parametrize("lines,problem", [
    (['{"text": "hello", "label": "routine"}'] * 10, "at least 2"),
    (['{"text": "chest pain", "label": "emergent"}', "not json"], "line 2: not a JSON object"),
    (['{"text": "", "label": "routine"}'], "line 1: 'text'"),
    (['{"text": "x", "label": "purple"}'], "label 'purple' is not in the configured labels"),
    (['{"text": "x", "label": "routine", "split": "test"}'], "'split'"),
])
def test_bad_examples_files_are_named(tmp_path: Path, lines: list[str], problem: str) -> None:
    f = tmp_path / "ex.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExamplesError, match=problem):
        read_examples(f, TRIAGE_LABELS)


# -- template and metrics -------------------------------------------------------------------------
def test_the_default_template_renders_json_for_every_label() -> None:
    template = '{"label": "{label}", "confidence": {confidence}}'
    assert check_template(template, TRIAGE_LABELS) is None
    c = Classification("urgent", 0.8312, {}, False)
    assert json.loads(render(template, c)) == {"label": "urgent", "confidence": 0.83}
    assert "valid JSON" in (check_template('{"label": {label}}', TRIAGE_LABELS) or "")
    assert check_template("Urgency: {label}", TRIAGE_LABELS) is None
    assert check_template("no placeholder", TRIAGE_LABELS) == "must contain {label}"


def test_metrics_count_abstentions_apart() -> None:
    labels = ["emergent", "routine"]
    m = triage_metrics(["emergent", "emergent", "routine", "routine"],
                       ["emergent", ABSTAIN_LABEL, "routine", "emergent"], labels)
    assert m["answered"] == 3 and m["abstention_rate"] == 0.25
    assert m["per_class"]["emergent"]["recall"] == 1.0 and m["per_class"]["routine"]["recall"] == 0.5
    assert m["confusion"]["emergent"][ABSTAIN_LABEL] == 1 and m["emergent_abstained"] == 1
