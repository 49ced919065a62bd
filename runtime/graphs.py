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
- **Graphs.** On CUDA each (cache, model, bucket, outputs wanted) is captured once, after a
  warm-up on a side stream, into one shared memory pool, then replayed: inputs are copied
  into the captured buffers, outputs are read from the captured ones (valid until the next
  replay of the same graph). On the CPU the same static forward runs eagerly, which is how
  the tests check it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: Any


@dataclass
class CudaGraphs:
    """Captured forwards, keyed by whatever fixes their shapes and buffers."""

    device: torch.device
    graphs: dict[tuple[Any, ...], _Graph] = field(default_factory=dict)
    captures: int = 0  # graphs captured so far (a growing count means shapes keep changing)
    _pool: Any = None

    def run(
        self, key: tuple[Any, ...], fn: Callable[[dict[str, torch.Tensor]], Any], inputs: dict[str, torch.Tensor]
    ) -> Any:
        """`fn(inputs)`, replayed from the graph captured for `key` (captured now if new).
        `fn` must take its tensors from the dict it is given, never from elsewhere."""
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(fn, inputs)
            self.graphs[key] = g
        else:
            for name, value in inputs.items():
                g.inputs[name].copy_(value)
            g.graph.replay()
        return g.output

    def _capture(self, fn: Callable[[dict[str, torch.Tensor]], Any], inputs: dict[str, torch.Tensor]) -> _Graph:
        static = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (cuBLAS workspaces, lazy inits) off the capture
            fn(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = fn(static)
        graph.replay()  # capture only records: run it once for this call's outputs
        self.captures += 1
        return _Graph(graph, static, output)

    def drop(self, owner: int) -> None:
        """Forget the graphs of one cache (its buffers were reallocated or released)."""
        for key in [k for k in self.graphs if k[0] == owner]:
            del self.graphs[key]
