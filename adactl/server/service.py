"""One engine loop shared by many connections: the part of `adactl serve` that knows no HTTP.

A single thread owns the engine and its `ControlLoop` and runs `step()` while any request is
unfinished; connections (asyncio tasks in the web server) talk to it through a command queue
(add, cancel) and receive their request's events on an asyncio queue of their own:

    ("added",)                 the engine accepted the request (it validated it)
    ("tokens", [ids])          tokens emitted this step, as soon as the step ends
    ("done", RequestResult)    the request finished (eos, length, context, cancelled)
    ("error", message)         the engine refused the request; nothing else changed
    ("rejected", retry_after)  it waited in the queue longer than `max_queue_wait_s`

Commands run between steps, so a cancel frees the request's KV cache at the end of the step
in flight at the latest. A controller that raises costs nothing but the step's decision (the
loop falls back to the safe action); an engine error fails the requests open at that moment
with an "error" event and the loop goes on with the next ones.

Admission: `overloaded()` says when `max_queue` requests already wait for their first token;
the web server then answers 429 with `retry_after()` seconds instead of queueing more.

Non-goals: tokenization and text (the web server's), HTTP, scheduling policy (the controllers').
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adactl.loop import ControlLoop
from adactl.runtime.types import SLO, RequestError, RequestView, SamplingParams

from .metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """Admission bounds of the engine loop."""

    max_queue: int = 64
    """Requests waiting for their first token at most; beyond that, new ones are refused (429)."""
    max_queue_wait_s: float = 60.0
    """A request still without its first token after this long is dropped and told to retry."""
    idle_wait_s: float = 0.05
    """How long the idle loop sleeps between looks at the command queue (a command wakes it)."""

    def validate(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {self.max_queue_wait_s}")


class Mailbox(Protocol):
    """Where a request's events go: a connection's `Client`, or a simulated client's reader."""

    def push(self, event: tuple[Any, ...]) -> None: ...


class Client:
    """One connection's mailbox: events from the engine thread onto its asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def push(self, event: tuple[Any, ...]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the connection's event loop is gone (server shutting down)
            pass


class EngineService:
    """Runs `loop.step()` on its own thread for requests submitted from any thread."""

    def __init__(self, loop: ControlLoop, metrics: ServerMetrics | None = None, config: ServiceConfig | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:  # fmt: skip
        """clock: what arrival times, queue waits and first-token rates are read from (the
        replay's simulated clock, where a bench steps the service itself with `tick`)."""
        self.loop = loop
        self.clock = clock
        self.engine: Any = loop.engine
        self.config = config or ServiceConfig()
        self.config.validate()
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._clients: dict[str, Mailbox] = {}  # engine thread only
        self._lock = threading.Lock()  # guards the counters below
        self._pending = 0  # submitted, not yet added to the engine
        self._waiting = 0  # in the engine without a first token
        self._open = 0  # submitted and not finished
        self._first_tokens: deque[float] = deque(maxlen=256)  # when recent requests got their first token
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self.step_errors = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adactl-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --------------------------------------------------- connection side API
    def submit(
        self,
        client: Mailbox,
        prompt: Sequence[int],
        sampling: SamplingParams,
        slo: SLO | None = None,
        stream: Any = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request for the engine thread; its events go to `client`. Returns its id."""
        with self._lock:
            rid = f"req-{self._next_id}"
            self._next_id += 1
            self._pending += 1
            self._open += 1
        arrival = self.clock() if arrival_time is None else arrival_time
        self._commands.put(("add", rid, list(prompt), sampling, slo, stream, arrival, client))
        self._wake.set()
        return rid

    def cancel(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); its KV cache is freed between steps."""
        self._commands.put(("cancel", request_id))
        self._wake.set()

    def overloaded(self) -> bool:
        """True when `max_queue` requests already wait for their first token."""
        with self._lock:
            return self._pending + self._waiting >= self.config.max_queue

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue over the recent first-token rate."""
        with self._lock:
            queued = self._pending + self._waiting
            recent = list(self._first_tokens)
        now = self.clock()
        recent = [t for t in recent if now - t < 30.0]
        rate = len(recent) / max(now - recent[0], 1.0) if len(recent) >= 2 else 0.0
        return int(min(60, max(1, math.ceil(queued / rate)))) if rate > 0 else 5

    def open_requests(self) -> int:
        """Requests submitted and not finished (what a test checks returns to 0)."""
        with self._lock:
            return self._open

    # ------------------------------------------------------- engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
        self._fail_all("the server is shutting down", queued_too=True)

    def tick(self) -> None:
        """One turn of the engine thread (never `start`ed when a caller turns it: `adactl bench
        serve --replay` does, in simulated time, calling it only while requests are open)."""
        try:
            self._tick()
        except Exception as e:  # noqa: BLE001 - an engine bug fails the open requests, not the server
            self._engine_failed(e)

    def _tick(self) -> None:
        """Commands, then one step (or a short wait when idle), then the step's events."""
        self._do_commands()
        if not self.engine.has_unfinished():
            self._wake.wait(self.config.idle_wait_s)
            self._wake.clear()
            return
        record = self.loop.step()
        self.metrics.observe_step(record)
        self.metrics.sync_fallbacks(self.loop.fallbacks)
        for rid, tokens in record.outcome.emitted.items():
            client = self._clients.get(rid)
            if client is not None and tokens:
                client.push(("tokens", list(tokens)))
        views = self.engine.requests()  # once per step: stale requests and the gauges
        self._drop_stale(views)
        self._deliver_finished()
        self.metrics.set_gauges(views, self.engine.kv_bytes())

    def _queued(self) -> Iterator[tuple[Any, ...]]:
        """The commands waiting now, oldest first (taking them off the queue)."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _do_commands(self) -> None:
        commands = list(self._queued())
        for cmd in commands:
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "cancel" and cmd[1] in self._clients:
                self.engine.cancel(cmd[1])
        if commands:
            self._deliver_finished()
            self.metrics.set_gauges(self.engine.requests(), self.engine.kv_bytes())

    def _add(
        self,
        rid: str,
        prompt: list[int],
        sampling: SamplingParams,
        slo: SLO | None,
        stream: Any,
        arrival: float,
        client: Mailbox,
    ) -> None:
        with self._lock:  # from pending to waiting at once: `overloaded()` never sees it in neither
            self._pending -= 1
            self._waiting += 1
        try:
            self.engine.add_request(prompt, sampling, request_id=rid, arrival_time=arrival, slo=slo, stream=stream)
        except RequestError as e:
            with self._lock:
                self._open -= 1
                self._waiting -= 1
            self.metrics.rejected("invalid")
            client.push(("error", str(e)))
            return
        self._clients[rid] = client
        self.metrics.prompt_tokens.inc(len(prompt))
        client.push(("added",))

    def _drop_stale(self, views: list[RequestView]) -> None:
        """Refuse requests that waited longer than `max_queue_wait_s` for their first token."""
        now = self.clock()
        waiting = 0
        for view in views:
            if view.status == "running":
                continue
            if now - view.arrival_time > self.config.max_queue_wait_s and view.request_id in self._clients:
                self.engine.cancel(view.request_id)
                self._clients[view.request_id].push(("rejected", self.retry_after()))
                self.metrics.rejected("queue_timeout")
            else:
                waiting += 1
        with self._lock:
            self._waiting = waiting

    def _deliver_finished(self) -> None:
        for rid, result in self.loop.pop_results().items():
            client = self._clients.pop(rid, None)
            with self._lock:
                self._open -= 1
                if result.first_token_time is not None:
                    self._first_tokens.append(result.first_token_time)
            self.metrics.observe_finished(result)
            if client is not None:
                client.push(("done", result))

    def _engine_failed(self, error: Exception) -> None:
        """A step raised midway: the engine's state is unknown, so every open request is
        dropped (told so) and the engine starts again from empty caches."""
        self.step_errors += 1
        self.metrics.engine_errors.inc()
        log.exception("engine step failed; failing the %d open requests", len(self._clients))
        self._fail_all(f"internal engine error ({type(error).__name__}: {error}); the request was dropped")

    def _fail_all(self, message: str, queued_too: bool = False) -> None:
        """Tell every open request `message` and drop it from the engine; `queued_too`: also the
        requests submitted but not yet added (at shutdown; after an error they start normally)."""
        try:
            self._deliver_finished()  # what finished before the failure is delivered as finished
        except Exception:  # noqa: BLE001 - the engine may be in a bad state; the clients still hear
            log.exception("collecting results failed")
        self.engine.abort_all()
        for client in self._clients.values():
            client.push(("error", message))
            self.metrics.requests.labels(outcome="error").inc()
        with self._lock:
            self._open -= len(self._clients)
            self._waiting = 0
        self._clients.clear()
        for cmd in self._queued() if queued_too else ():
            if cmd[0] == "add":
                with self._lock:
                    self._pending -= 1
                    self._open -= 1
                cmd[-1].push(("error", message))
