"""Token ids to streamed text: incremental detokenization with stop strings.

`TextStream.add(tokens)` returns the text that is safe to send now: it holds back a trailing
incomplete UTF-8 character (decoded as U+FFFD) and any tail that could still become a stop
string, and ends the text before the first stop string (which is not sent, as in OpenAI's
API). The concatenation of everything returned, `finish()` included, is the decoded output.
Each call decodes a few tokens, not the whole output (long outputs stay linear).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """One request's output text, released piece by piece."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` released
        self.stopped = False  # a stop string was found: the output ends here
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the tail of `text` (vLLM's offsets)

    def add(self, tokens: Sequence[int]) -> str:
        """Text to send after `tokens` were emitted ('' if nothing is safe yet)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        self._decode(final=False)
        if self._cut_at_stop():
            return self._release(len(self.text))
        return self._release(self._before_partial_stop(len(self.text)))

    def finish(self) -> str:
        """Whatever is left, at the end of the output."""
        if not self.stopped:
            self._decode(final=True)
            self._cut_at_stop()
        return self._release(len(self.text))

    def _decode(self, final: bool) -> None:
        """Append the text of the new ids, decoding only a window (as vLLM's detokenizer does:
        the last decoded tokens give the context a tokenizer needs, e.g. for leading spaces);
        an incomplete multi-byte character (U+FFFD at the end) waits for its next byte."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _cut_at_stop(self) -> bool:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text, self.stopped = self.text[: min(hits)], True
        return True

    def _before_partial_stop(self, end: int) -> int:
        """The end of `text[:end]` without a tail that is the start of a stop string."""
        cut = end
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.sent), 0, -1):  # longest first
                if self.text[end - n : end] == s[:n]:
                    cut = min(cut, end - n)
                    break
        return cut

    def _release(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out
