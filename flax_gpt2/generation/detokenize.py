"""Streamed text from streamed tokens: the one incremental detokenizer (`sample`, `generate_text` and the server).

Tokens are bytes (GPT-2's BPE is byte-level), and one character may be split across tokens: the bytes go
through an incremental UTF-8 decoder, so a half character is held back until it completes (or, at the end,
becomes U+FFFD exactly as `tokenizer.decode` of the whole sequence would). With stop strings, the last
`max(len(stop)) - 1` characters are held back too, since they could still be the start of one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class Detokenizer:
    """Text of the generated tokens as they come.

    `add(token_bytes)` appends one token's bytes and says whether a stop string appeared (the text is then cut
    just before it); `take(final)` returns the text not yet handed out that can no longer change. Total work
    is linear in the text's length: each token is decoded once and stop strings are searched only near the end.
    """

    def __init__(self, stop: Iterable[str] = ()):
        """`stop`: strings that end the text (cut before them); empty ones match nowhere and are ignored."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, data: bytes, final: bool = False) -> bool:
        """Appends a token's bytes; True if a stop string appeared (the text is then cut before it)."""
        if self.stopped:
            return True
        before = len(self.text)
        self.text += self._decoder.decode(data, final=final)
        if self.stop:
            start = max(0, before - self._hold)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """The text not yet handed out that can no longer change (all of it when `final`)."""
        if final and not self.stopped:
            self.text += self._decoder.decode(b"", final=True)  # a trailing half character becomes U+FFFD
        end = len(self.text) if final else max(self.sent, len(self.text) - self._hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
