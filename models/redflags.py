"""The red-flag net: phrases that force the most urgent label, whatever the classifier says.

Pure (no model, no I/O once built); called by ``models.classifier`` on the event-loop thread.

A phrase list is plain text, one phrase a line, ``#`` starts a comment. In a phrase:
- words match whole words, case-insensitively, across any spacing or punctuation between them;
- an apostrophe is optional and may be typed any way (``can't`` matches ``cant``, ``can’t``);
- ``word*`` matches any word starting with ``word`` (``bleed*``: bleeding, bleeds);
- ``...`` lets up to three other words stand between its neighbours (``face ... droop*``
  matches "face is drooping" and "face looks droopy");
- ``{n}`` matches a number (``{n} weeks old``);
- a phrase never reaches across a clause end (``. , ; : ! ?``).

A match is **not** a flag when a negation cue stands inside one of its ``...`` gaps
("pregnant ... bleeding" does not fire on "pregnant and no bleeding"), or when, in the same clause (clauses end at ``. , ; : ! ?`` and at
*but*, *however*, *although*, *except*, *apart from*), it is:
- preceded within five words by a negation cue (*no*, *not*, *denies*, *without*, *never*,
  *negative for*, *doesn't have*, ...): "no chest pain" is not a flag, and neither is
  "not having any trouble breathing" (uncertainty and worsening are not negations: "not sure",
  "no longer", "not getting better" never suppress a flag);
- preceded by a history cue (*history of*, *hx of*, *family history*, *in the past*) or followed
  within four words by *years ago* / *months ago*: "my dad had a stroke 10 years ago".
The net can only raise urgency: ``models.classifier`` applies it after the classifier and never
lowers a label because of it. Ending a negation at a comma is deliberate: "no fever, chest pain
since this morning" must fire, and over-triage is the safe mistake.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_NEGATION = (
    "no", "not", "denies", "denied", "deny", "denying", "without", "never", "negative for", "free of",
    "none", "nor", "neither", "doesn't have", "does not have", "don't have", "do not have", "didn't have",
    "did not have", "isn't", "is not", "wasn't", "was not", "hasn't", "has not", "haven't", "have not",
    "no signs of", "no sign of", "absence of", "ruled out", "rules out",
)
_PSEUDO = re.compile(r"\b(?:not sure|not certain|no idea|not only|not just|no longer|not know|no matter|not getting better|not improving|not stopping|not stop|no better|not better)\b")
_HISTORY = ("history of", "hx of", "h/o", "family history", "in the past", "previous", "prior", "years ago")
_POST_HISTORY = re.compile(r"^\W*(?:\w+\W+){0,4}?(?:years?|months?|yrs?)\s+ago\b")
_CLAUSE_END = re.compile(r"[.,;:!?\n]|\b(?:but|however|although|though|except|apart from|yet)\b")
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_APOS = "['’`]?"


def _norm(text: str) -> str:
    return text.lower().replace("’", "'").replace("`", "'")


_SEP = r"[^\w.,;:!?\n]+"  # what may stand between two words of a phrase: never a clause end
_GAP = r"((?:" + _SEP + r"[\w']+){0,3})"  # '...': up to three words, captured (checked for negation)


def _phrase_regex(phrase: str) -> str:
    parts: list[str] = []
    for i, tok in enumerate(phrase.lower().split()):
        if tok == "...":
            parts.append(_GAP)
            continue
        if tok == "{n}":
            body = r"\d+(?:[.,]\d+)?"
        else:
            star = tok.endswith("*")
            body = _APOS.join(re.escape(p) for p in re.split(r"['’`]", tok.rstrip("*")))
            if star:
                body += r"[\w']*"
        parts.append(("" if i == 0 else _SEP) + body)
    return r"\b" + "".join(parts) + r"\b"


_ANCHOR_WORD = re.compile(r"[a-z0-9]+")


def _anchor(phrase: str) -> tuple[str, bool]:
    """The word every match of ``phrase`` contains (the longest plain one; else a prefix)."""
    tokens = [t.replace("'", "").replace("’", "").replace("`", "") for t in phrase.lower().split() if t not in ("...", "{n}")]
    plain = [t for t in tokens if not t.endswith("*")]
    if plain:
        return max(plain, key=len), False
    return max((t.rstrip("*") for t in tokens), key=len), True


def parse_phrases(text: str) -> tuple[str, ...]:
    """The phrases of a red-flag file (comments and blank lines dropped, order kept)."""
    out: list[str] = []
    for line in text.splitlines():
        phrase = line.split("#", 1)[0].strip()
        if phrase and phrase not in out:
            out.append(phrase)
    return tuple(out)


def load_phrases(path: Path) -> tuple[str, ...]:
    return parse_phrases(path.read_text(encoding="utf-8"))


def phrases_hash(phrases: tuple[str, ...]) -> str:
    """sha256 of the normalised list: what the journal records as the list that produced a flag."""
    return hashlib.sha256("\n".join(phrases).encode()).hexdigest()


@dataclass(frozen=True)
class RedFlagHit:
    phrase: str
    start: int
    end: int


class RedFlagNet:
    def __init__(self, phrases: tuple[str, ...]) -> None:
        if not phrases:
            raise ValueError("the red-flag list is empty")
        bad = [p for p in phrases if not re.search(r"\w", p) or p.split()[0] == "..." or p.split()[-1] == "..."]
        if bad:
            raise ValueError(f"red-flag phrase {bad[0]!r} has no words at one end")
        self.phrases = phrases
        self.sha256 = phrases_hash(phrases)
        self._patterns = [(p, re.compile(_phrase_regex(p)), _anchor(p)) for p in phrases]
        cues = sorted(_NEGATION + _HISTORY, key=len, reverse=True)
        self._cue = re.compile(r"\b(?:" + "|".join(re.escape(c).replace("'", _APOS) for c in cues) + r")\b")

    def check(self, text: str) -> list[RedFlagHit]:
        """The phrases that fire in ``text`` (each at most once, in list order)."""
        norm = _norm(text)
        words = set(_ANCHOR_WORD.findall(norm.replace("'", "")))
        hits: list[RedFlagHit] = []
        for phrase, pattern, (anchor, prefix) in self._patterns:
            # Cheap pre-filter: a phrase can only match where its anchor word occurs.
            if not (anchor in words if not prefix else any(w.startswith(anchor) for w in words)):
                continue
            for m in pattern.finditer(norm):
                gaps = " ".join(g for g in m.groups() if g)
                if not (gaps and self._cue.search(gaps)) and not self._suppressed(norm, m.start(), m.end()):
                    hits.append(RedFlagHit(phrase, m.start(), m.end()))
                    break
        return hits

    def _suppressed(self, text: str, start: int, end: int) -> bool:
        before = text[max(0, start - 80):start]
        ends = list(_CLAUSE_END.finditer(before))
        if ends:
            before = before[ends[-1].end():]
        window = _PSEUDO.sub(" ", " ".join(_WORD.findall(before)[-5:]))
        if self._cue.search(window):
            return True
        after = text[end:end + 60]
        stop = _CLAUSE_END.search(after)
        if stop:
            after = after[:stop.start()]
        return bool(_POST_HISTORY.search(after))
