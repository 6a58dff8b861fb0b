"""Turn a sequence's token pieces into client text: UTF-8 reassembly and stop strings.

One ``TextStream`` per sequence, driven by the engine thread after each step. Pure Python.

- Token pieces are bytes; a character may be split across tokens, so bytes are decoded
  incrementally and an incomplete character waits for the next piece.
- Stop strings never reach the client: text that could be the beginning of a stop string is held
  back until the next piece proves it is not (or is). When a stop string completes, the text
  before it is released and the stream reports ``stopped``; the rest is discarded.
- ``finish()`` releases what is held back when the sequence ends for another reason.
"""

from __future__ import annotations

import codecs


class TextStream:
    __slots__ = ("_decoder", "_stops", "_max_stop", "_held", "stopped")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that may be sent now ("" if none)."""
        if self.stopped:
            return ""
        text = self._decoder.decode(piece)
        if not self._stops:
            return text
        if not text:
            return ""
        held = self._held + text
        # A stop string can only complete inside the new text plus what was held back.
        first = -1
        for stop in self._stops:
            i = held.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self.stopped = True
            self._held = ""
            return held[:first]
        keep = self._holdback(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def finish(self) -> str:
        """The sequence ended without a stop string: release everything still held."""
        if self.stopped:
            return ""
        tail = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return tail

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_stop - 1), 0, -1):
            suffix = text[-n:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return n
        return 0
