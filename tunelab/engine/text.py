"""Turning a growing decoded text into safe-to-send pieces: stop strings and incomplete characters.

Pure Python, no tokenizer: the caller decodes the generated tokens and passes the whole text each step.
A piece is held back while it could still be the start of a stop string (so a client never receives half
of one) or while it ends in U+FFFD (a multi-byte character whose remaining bytes are in the next token).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    """Feed the full decoded text after each token; get the new text to send and whether a stop hit."""

    stops: tuple[str, ...] = ()
    emitted: int = 0
    stopped: bool = False
    _text: str = field(default="", repr=False)

    def update(self, text: str) -> tuple[str, bool]:
        """Return (new text to send, stop string found). After a stop, the text is cut before it."""
        if self.stopped:
            return "", True
        self._text = text
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped = True
            piece = text[self.emitted : hit] if hit > self.emitted else ""
            self.emitted = max(self.emitted, hit)
            return piece, True
        safe = len(text) - self._held_back(text)
        if safe <= self.emitted:
            return "", False
        piece = text[self.emitted : safe]
        self.emitted = safe
        return piece, False

    def flush(self) -> str:
        """At the end of generation (EOS or length) everything not yet sent goes out."""
        if self.stopped:
            return ""
        piece = self._text[self.emitted :]
        self.emitted = len(self._text)
        return piece

    def _first_stop(self, text: str) -> int | None:
        # Only the unsent tail (plus room for a stop straddling the boundary) can hold a new stop string.
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        found = [i for i in (text.find(s, start) for s in self.stops if s) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        hold = 0
        for s in self.stops:
            # The longest suffix of the text that is a proper prefix of this stop string.
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return hold
