"""Text of a growing list of generated tokens, decoded incrementally.

Decoding the whole output at every token costs O(n) per token, O(n^2) per request: a
3,000-token answer spent more time in the tokenizer than in the model. As vLLM and TGI do,
only a short window is decoded: the text of tokens[prefix:] minus the text of
tokens[prefix:read] is what the newest tokens added. A byte sequence that does not yet make a
whole character (U+FFFD at the end) waits for its next token.

Stop strings: the text is searched only where a new match can start, and the last
(longest stop - 1) characters are held back until they can no longer begin one, so a
streamed piece never has to be taken back.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, decode, stops=()):
        """decode: token ids -> text (the tokenizer's, special tokens skipped)."""
        self._decode = decode
        self.stops = list(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] were decoded last time, as context for the next ones
        self._read = 0
        self.text = ""  # the text of tokens[:_read]
        self._searched = 0  # text[:_searched] holds no stop string that ends there
        self.stop_at: int | None = None  # where the first stop string starts, once one showed
        self._sent = 0

    def add(self, tokens) -> None:
        """Takes the new tokens and extends the text with what they complete."""
        if not tokens:
            return
        self.tokens.extend(tokens)
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
        self._find_stop()

    def _find_stop(self) -> None:
        if self.stop_at is not None or not self.stops:
            return
        start = max(0, self._searched - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        self._searched = len(self.text)

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def piece(self) -> str:
        """The text not yet given out that is certain: up to a stop string, else all but the
        characters that may still begin one."""
        end = self.stop_at if self.stop_at is not None else len(self.text) - self._hold
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : end], end
        return out

    def last_piece(self, final_text: str) -> str:
        """At the end: what remains of final_text (the whole output decoded at once, cut at the
        first stop string) after what was given out."""
        given = self.text[: self._sent]
        if final_text.startswith(given):
            out, self._sent = final_text[len(given) :], len(final_text)
            return out
        return ""  # the tokenizer decodes differently in pieces: nothing can be taken back
