"""Token ids to streamed text: incremental detokenization with stop strings.

`TextStream.add(tokens)` returns the text that is safe to send now: it holds back a trailing
incomplete UTF-8 character (decoded as U+FFFD) and any tail that could still become a stop
string, and ends the text before the first stop string (which is not sent, as in OpenAI's
API). The concatenation of everything returned, `finish()` included, is the decoded output.
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
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` released
        self.stopped = False  # a stop string was found: the output ends here

    def add(self, tokens: Sequence[int]) -> str:
        """Text to send after `tokens` were emitted ('' if nothing is safe yet)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self._cut_at_stop():
            return self._release(len(self.text))
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":  # a multi-byte character not yet complete
            end -= 1
        end = min(end, self._before_partial_stop(end))
        return self._release(end)

    def finish(self) -> str:
        """Whatever is left, at the end of the output."""
        return self._release(len(self.text))

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
