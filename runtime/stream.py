"""Streaming consumers: a request's output is read unit by unit at a rate (DESIGN.md section 4).

A consumer reads a request's output in units (tokens, words or sentences, found in the
decoded text) at `Stream.rate` units per second. The stream opens `Stream.ttft_s` after the
request arrives (the TTFT target); the first unit is due then for token readers, and one unit
period later (ttft_s + 1 / rate) for readers of words and sentences, who need a whole unit
before they can start (`Stream.first_unit_s`); then one unit is due every 1 / rate seconds.
The *buffer* is output that is ready but not yet read. When a unit is not ready at its
deadline the consumer stalls, reads the late unit the moment it is ready and resumes its
schedule from there, as a media player does (the next unit is due 1 / rate after the late one
arrived). A stall of d seconds on unit i counts as ceil(d * rate) *missed units*: the units
i, i + 1, ... the reader would have read in that time (issue 33: a 60 s wait and a 10 ms one
are not the same miss). Only units the stream has count, each once: a 10 s wait for the first
of 8 units misses 8, not 50, and back-to-back stalls whose windows overlap count the shared
units once. So the misses of a stream never exceed its units, and misses / units is the
fraction of units whose reading a stall disrupted (the 0.5% of the SLO), whatever the load.

`Playback` keeps one consumer's account from the times units became ready; it needs nothing
of the engine, so a custom server can keep one per request too. The engine keeps one for every
request added with `stream=` and shows it to controllers as `RequestView.stream_progress`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import RequestError

UNITS = ("token", "word", "sentence")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s")


class StreamError(RequestError):
    """A stream description that cannot be served (bad rate, unknown unit, ...)."""


@dataclass(frozen=True)
class Stream:
    """How a request's output is consumed."""

    rate: float
    """Units read per second (> 0): reading is about 3-8 tokens/s, speech 4-5 tokens/s."""
    unit: str = "token"
    """"token", "word" or "sentence" (words and sentences are found in the decoded text)."""
    ttft_s: float = 1.0
    """The stream opens (its first token is due) this many seconds after the request arrives."""

    @property
    def first_unit_s(self) -> float:
        """Seconds after arrival when the first unit is due: ttft_s for tokens; for words and
        sentences one unit period later, the time a reader takes to reach the end of the first
        unit once the stream has opened (a sentence is about 20 tokens: due at the TTFT, no
        server could meet it)."""
        return self.ttft_s if self.unit == "token" else self.ttft_s + 1.0 / self.rate

    def validate(self) -> None:
        for name in ("rate", "ttft_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise StreamError(f"stream {name} must be a finite number > 0, got {v!r}")
        if self.unit not in UNITS:
            raise StreamError(f"stream unit must be one of {', '.join(UNITS)}; got {self.unit!r}")


def count_units(unit: str, tokens: int, text: str, finished: bool) -> int:
    """Complete units in an output of `tokens` tokens decoding to `text`. A word is complete
    once whitespace follows it, a sentence once whitespace follows its end mark; at the end of
    the output whatever is left counts as one more unit."""
    if unit == "token":
        return tokens
    if unit == "word":
        words = text.split()
        if finished or not words or text[-1].isspace():
            return len(words)
        return len(words) - 1
    ends = list(_SENTENCE_END.finditer(text))
    n = len(ends)
    rest = text[ends[-1].end() :] if ends else text
    return n + (1 if finished and rest.strip() else 0)


@dataclass(frozen=True)
class StreamProgress:
    """One consumer's position at a moment, as a controller sees it."""

    units_ready: int  # units generated so far
    units_read: int  # units the consumer has read (or is stalled on, when it missed)
    next_due: float  # deadline of the next unread unit (time.perf_counter() clock)
    misses: int  # missed units so far: each stall of d seconds counts ceil(d * rate) (module docstring)
    tokens_per_unit: float  # tokens per unit in this output so far (1 for token units)
    rate: float  # units per second

    @property
    def buffer(self) -> int:
        """Units ready and not yet read."""
        return self.units_ready - self.units_read

    def slack(self, now: float) -> float:
        """Seconds until the consumer runs out of ready units (negative: it is stalled)."""
        return self.next_due - now + self.buffer / self.rate


@dataclass
class Playback:
    """A consumer's account of one stream: ready times, reads, misses."""

    stream: Stream
    arrival: float
    ready_times: list[float] = field(default_factory=list)  # when unit m became ready
    read: int = 0  # units read so far
    due: float = 0.0  # deadline of unit `read`
    misses: int = 0  # missed units: a stall of d seconds on unit i, units i .. i + ceil(d * rate) - 1
    stalls: int = 0  # stalls (late units), however long
    tokens: int = 0
    finished: bool = False
    _missed_to: int = 0  # units before this index are counted missed already (or were read on time)

    def __post_init__(self) -> None:
        self.due = self.arrival + self.stream.first_unit_s

    def produce(self, units_ready: int, tokens: int, now: float, finished: bool = False) -> None:
        """The output now holds `units_ready` complete units (`tokens` tokens) at time `now`."""
        self.advance(now)  # reads due before these units existed happen first
        while len(self.ready_times) < units_ready:
            self.ready_times.append(now)
        self.tokens, self.finished = tokens, self.finished or finished

    def advance(self, now: float) -> None:
        """Let the consumer read everything it would have read by `now`."""
        period = 1.0 / self.stream.rate
        while self.read < len(self.ready_times):
            ready = self.ready_times[self.read]
            if ready <= self.due:  # on time: read at its deadline
                if self.due > now:
                    return
                self.due += period
            else:  # late: the stall's missed units, read the moment it was ready
                self._miss(self._stall_units(ready - self.due))
                self.stalls += 1
                self.due = ready + period
            self.read += 1
        if not self.finished and self.due < now:  # stalled now: the next unit is past due, not generated
            self._miss(self._stall_units(now - self.due))  # so far; the rest when it comes

    def _miss(self, units: int) -> None:
        """A stall on unit `read` long enough for `units` reads: units read .. read + units - 1
        are missed, those not counted by an earlier stall (or this one, as it went on)."""
        end = self.read + units
        self.misses += max(0, end - max(self.read, self._missed_to))
        self._missed_to = max(self._missed_to, end)

    @property
    def read_end(self) -> float | None:
        """When the consumer reads its last unit, once `settle` has run (None: nothing was
        ready). A read moves the next deadline one period on, so the last read so far was one
        period before `due`; units still unread after `settle` are all ready before their
        deadlines and are read one a period from `due`."""
        if not self.ready_times:
            return None
        period = 1.0 / self.stream.rate
        return self.due + (len(self.ready_times) - self.read - 1) * period

    def _stall_units(self, seconds: float) -> int:
        """Missed units of a stall of `seconds` (> 0): at least one."""
        return max(1, math.ceil(seconds * self.stream.rate - 1e-9))

    def progress(self, now: float) -> StreamProgress:
        self.advance(now)
        n = len(self.ready_times)
        per_unit = self.tokens / n if n and self.stream.unit != "token" else _PRIOR_TOKENS[self.stream.unit]
        return StreamProgress(n, self.read, self.due, self.misses, per_unit, self.stream.rate)

    def settle(self) -> tuple[int, int]:
        """(units, misses) once the output is complete: the rest is read on time. Misses counted
        past the last unit are taken back: a stall outlasted the stream, or its reader waited for
        a unit that never came (the output ended)."""
        if self.ready_times:
            self.advance(max(self.ready_times[-1], self.due))
        units = len(self.ready_times)
        if self._missed_to > units:
            self.misses -= self._missed_to - units
            self._missed_to = units
        return units, self.misses


_PRIOR_TOKENS = {"token": 1.0, "word": 1.3, "sentence": 20.0}
