"""Static shapes and CUDA graphs for the decode, verify and draft forwards.

On a GPU a small model's step is mostly kernel launches and Python; vLLM, SGLang and gpt-fast
capture the decode forward as a CUDA graph per batch-size bucket and replay it. We do the
same on top of `BatchKV` (kv.py), which already preallocates each model's cache:
- **Buckets.** A forward of n rows and T new tokens per row runs as the smallest bucket
  (rows, tokens) that holds it (`StaticShapes`); padding rows and slots are computed and
  ignored. Shapes outside the buckets (long prefill chunks, tree levels with an explicit
  context, a second verify range) run eagerly.
- **Static forward.** Inside a bucket nothing depends on the step: the new keys and values
  are written at per-row column indices held in a tensor (padding rows write to scratch
  columns at the end of the cache, never valid), attention runs over the cache's whole
  column capacity with an explicit mask, and positions come in as a tensor. The cache grows
  in whole blocks of columns, and a growth re-captures the graphs of that cache.
- **Graphs.** Each (cache, model, bucket, outputs wanted) is captured once, after a warm-up
  on a side stream, then replayed: inputs are copied into the captured buffers, outputs are
  read from the captured ones (valid until the next replay of the same graph; `kv.py` copies
  what it returns, so no output depends on which graph replays next in the shared pool).
- **Lifetime.** A cache is keyed by a number never reused (`owner_key`), not by `id()`, whose
  addresses CPython recycles: a graph of a freed cache can never match a new one. A cache
  that reallocates or closes drops its graphs (`drop`; when none are left, the next capture
  takes a new memory pool), and the engine's caches live as long
  as the engine (kv.py keeps their buffers over a drain when graphs are on), so a burst after
  an idle moment replays what the last one captured.
- **Failures.** A forward that cannot be captured (one that waits for the device: transformers'
  dynamic RoPE tests a CUDA tensor in an `if`) runs eagerly from then on at that shape, with
  one warning per `CudaGraphs` and a count (`capture_failures`). The warm-up runs under
  `torch.cuda.set_sync_debug_mode("error")`, so such a forward fails there, before a capture
  has begun.
- **On the CPU** there are no graphs; a stand-in (`RecordedForward`) replays by running the
  forward again on the captured inputs and copying its outputs into the captured ones, so
  the bookkeeping (keys, drops, the eager fallback, outputs overwritten by a replay) runs and
  is tested without a GPU. Engines use it only when asked (`EngineConfig(graphs=True)`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StaticShapes:
    """The buckets static forwards run in."""

    rows: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    """Batch sizes captured (vLLM captures 1, 2, 4, then multiples of 8)."""
    tokens: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)
    """New tokens per row captured: decode (1), verifying k drafted tokens (k + 1), catch-up."""
    col_block: int = 256
    """The cache's column capacity grows in multiples of this (each growth re-captures)."""

    @property
    def scratch(self) -> int:
        """Columns kept free at the end of the capacity for padding rows to write into."""
        return self.tokens[-1]

    def bucket(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """The smallest (rows, tokens) bucket holding a forward, or None (run it eagerly)."""
        i, j = bisect.bisect_left(self.rows, rows), bisect.bisect_left(self.tokens, tokens)
        if i == len(self.rows) or j == len(self.tokens):
            return None
        return self.rows[i], self.tokens[j]


_owners = itertools.count(1)


def owner_key() -> int:
    """A number naming one cache for the process's lifetime (never reused, unlike `id()`)."""
    return next(_owners)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph or RecordedForward: has replay()
    inputs: dict[str, torch.Tensor]
    output: Any


Forward = Callable[[dict[str, torch.Tensor]], Any]
Capture = Callable[[Forward, dict[str, torch.Tensor]], tuple[Any, Any]]
"""(fn, static inputs) -> (graph with .replay(), the outputs it writes): how a forward is captured."""


class RecordedForward:
    """The CPU's stand-in for a CUDA graph (module docstring): `replay` runs the forward again
    on the captured inputs and copies its outputs into the captured ones."""

    def __init__(self, fn: Forward, inputs: dict[str, torch.Tensor]) -> None:
        self.fn, self.inputs = fn, inputs
        self.output = fn(inputs)

    def replay(self) -> None:
        _copy_into(self.output, self.fn(self.inputs))


def _copy_into(dst: Any, src: Any) -> None:
    """Copy every tensor of `src` into the same place in `dst` (model outputs: transformers'
    `ModelOutput` mappings, dataclasses such as a feature draft's output, tuples of hidden
    states); anything else (a cache object, None) is not an output a graph writes."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif isinstance(dst, Mapping):
        for name, value in dst.items():
            _copy_into(value, src[name])
    elif dataclasses.is_dataclass(dst) and not isinstance(dst, type):
        for f in dataclasses.fields(dst):
            _copy_into(getattr(dst, f.name), getattr(src, f.name))


def record(fn: Forward, inputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    forward = RecordedForward(fn, inputs)
    return forward, forward.output


class CudaGraphs:
    """Captured forwards, keyed by whatever fixes their shapes and buffers (the first element:
    the owning cache's `owner_key`)."""

    def __init__(self, device: torch.device | str, capture: Capture | None = None) -> None:
        self.device = torch.device(device)
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.eager: set[tuple[Any, ...]] = set()  # buckets whose capture failed: eager for good
        self.captures = 0  # graphs captured so far (a growing count means shapes keep changing)
        self.capture_failures = 0
        self.capture: Capture = capture or (self._cuda_capture if self.device.type == "cuda" else record)
        self._pool: Any = None
        self._warned = False

    def run(
        self, key: tuple[Any, ...], fn: Forward, inputs: dict[str, torch.Tensor], bucket: tuple[Any, ...] | None = None
    ) -> Any:
        """`fn(inputs)`, replayed from the graph captured for `key` (captured now if new; run
        eagerly if the capture of its `bucket` ever failed: what fails is the model's forward
        at that shape, whichever cache or capacity it runs on; default: the key). `fn` must
        take its tensors from the dict it is given, never from elsewhere."""
        bucket = bucket if bucket is not None else key
        if bucket in self.eager:
            return fn(inputs)
        g = self.graphs.get(key)
        if g is None:
            static = {name: value.clone() for name, value in inputs.items()}
            try:
                graph, output = self.capture(fn, static)
            except Exception as e:  # noqa: BLE001 - any failure: this forward runs eagerly
                self._failed(bucket, e)
                return fn(inputs)
            g = self.graphs[key] = _Graph(graph, static, output)
            self.captures += 1
            return g.output  # the capture ran the forward on these inputs
        for name, value in inputs.items():
            g.inputs[name].copy_(value)
        g.graph.replay()
        return g.output

    def _failed(self, key: tuple[Any, ...], error: Exception) -> None:
        self.eager.add(key)
        self.capture_failures += 1
        if self.device.type == "cuda":
            try:  # a capture that failed midway leaves an error on the stream
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass
        if not self._warned:
            self._warned = True
            first = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"adactl: a forward could not be captured as a CUDA graph ({type(error).__name__}: {first}); "
                          "it runs eagerly from now on, with the right output but host overhead (counted in "
                          "capture_failures)", RuntimeWarning, stacklevel=3)  # fmt: skip

    def _cuda_capture(self, fn: Forward, static: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")  # a forward that waits for the device fails here, not mid-capture
        try:
            with torch.cuda.stream(side):  # warm-up (cuBLAS workspaces, lazy inits) off the capture
                fn(static)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = fn(static)
        graph.replay()  # capture only records: run it once for this call's outputs
        return graph, output

    def drop(self, owner: int) -> None:
        """Forget the graphs of one cache (its buffers were reallocated or released)."""
        for key in [k for k in self.graphs if k[0] == owner]:
            del self.graphs[key]
        if not self.graphs:
            # The pool's last graph is gone: torch counts the graphs sharing a pool and releases
            # it at zero, but keeps it while any tensor allocated in it lives (an output still
            # held); a capture into it then fails an internal assert (use_count > 0). Seen on an
            # H200 with torch 2.11 in `adactl profile`, which grows its caches: the next capture
            # takes a new pool.
            self._pool = None

    def owners(self) -> set[int]:
        """The caches that have graphs."""
        return {k[0] for k in self.graphs}
