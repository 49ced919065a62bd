"""Small row counts on the CPU: which row count each of a model's float32 `linear` layers
computes a forward's rows as, measured on this machine once and cached.

Torch's CPU float32 `linear` picks its kernel and blocking by the input's row count and the
CPU's vector instructions, and some counts are far slower than a larger one: on the 2-core
machine of 2026-12-04 a forward of SmolLM2 over 2, 3, 4, 5 tokens took 99, 124, 95, 80 ms (issue
31); on the 2-core Intel Xeon (AVX-512) of 12-05 its body's linear layers take 17.5, 19.6, 26.7,
27.3 ms for 2, 3, 4, 5 rows, and the output layer 8.5-21 ms for 4-15 rows against 9.9 for 16
(`docs/issue30/row_padding/`). A fixed rule, tuned on one machine, is wrong on another: the
engine's rule from the first (2 and 3 rows padded to 5) made plain decoding at batch 2 and a
k = 1 step at batch 1 take 1.62x and 1.55x as long on the second (56 against 35 ms, 60 against 39).

So the padding is measured: for each weight shape (out, in) of the model, one timed pass over
its layers (a sample of them, `SAMPLE_BYTES` of weights, more than a CPU's caches hold, as the
forward streams them) at each row count 1 .. `TUNED_ROWS`, in alternating order, the fastest of
`REPS` passes (noise only ever slows one); a count pads to a larger one where that is faster by
`MARGIN` (`choose_rows`). Past `TUNED_ROWS` a count pads as the one of the same residue modulo
4 among the last four measured (blocks of 4 rows are what the kernels block by).
The table is cached under `$ADACTL_CACHE/row_padding/`, keyed by the CPU, its threads, torch
and the shapes, so every process on this machine pads alike and a profile measured here
prices the steps that run here. Models whose linear weights fit a CPU's caches
(< `MIN_BYTES`: the tests' tiny models) are not measured and not padded: their `linear` costs
microseconds. Other devices and dtypes are never padded (bfloat16's output layer took 3.4-4.4
ms for 1 to 8 rows alike)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

TUNED_ROWS = 32
REPS = 3
MARGIN = 0.1
MIN_BYTES = 32 << 20
SAMPLE_BYTES = 64 << 20
VERSION = 1  # of the measurement: a cached table of another version is measured again

log = logging.getLogger(__name__)
Shape = tuple[int, int]  # a linear layer's (out_features, in_features)


def choose_rows(seconds: Sequence[float], margin: float = MARGIN) -> tuple[int, ...]:
    """For each row count m = 1 .. len(seconds) (`seconds[m - 1]`: a pass at m rows), m itself
    unless a larger count's pass is faster by `margin`; then the smallest count within `margin`
    of the fastest (16 rows, not 19 that measured 5% faster still)."""
    n = len(seconds)
    chosen = []
    for m in range(1, n + 1):
        best = min(seconds[m - 1 :])
        if best >= (1.0 - margin) * seconds[m - 1]:
            chosen.append(m)
        else:
            chosen.append(next(j for j in range(m, n + 1) if seconds[j - 1] <= (1.0 + margin) * best))
    return tuple(chosen)


@dataclass(frozen=True)
class RowPadding:
    """Per weight shape, the row count each of 1 .. len(targets) rows is computed as."""

    targets: dict[Shape, tuple[int, ...]]

    def rows(self, rows: int, shape: Shape) -> int:
        table = self.targets.get(shape)
        if not table or rows <= 0:
            return rows
        n = len(table)
        if rows <= n:
            return table[rows - 1]
        m = n - (n - rows) % 4  # the last measured count of the same residue modulo 4
        pad = table[m - 1] - m
        return rows + pad if pad < 4 else rows

    def pads(self, rows: int) -> bool:
        """Whether a forward of `rows` rows pads any layer."""
        return any(self.rows(rows, shape) != rows for shape in self.targets)

    def to_dict(self) -> dict[str, list[int]]:
        return {f"{o}x{i}": list(t) for (o, i), t in self.targets.items()}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> RowPadding:
        """The table `to_dict` wrote; ValueError where a count would shrink (not a table of ours)."""
        table = cls({_shape(k): tuple(int(x) for x in v) for k, v in d.items()})
        if any(t < m for row in table.targets.values() for m, t in enumerate(row, 1)):
            raise ValueError("a row padding table pads a count to fewer rows")
        return table


NONE = RowPadding({})


def _shape(key: str) -> Shape:
    o, i = key.split("x")
    return int(o), int(i)


def _groups(model: torch.nn.Module) -> dict[Shape, list[torch.nn.Linear]]:
    groups: dict[Shape, list[torch.nn.Linear]] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            groups.setdefault((m.out_features, m.in_features), []).append(m)
    return groups


def measure(model: torch.nn.Module, rows: int | None = None, reps: int = REPS,
            margin: float = MARGIN) -> tuple[RowPadding, dict[str, list[float]]]:  # fmt: skip
    """The table of `model`'s linear layers on this machine (module docstring), and the
    measured seconds of each shape's pass at 1 .. `rows` rows (`TUNED_ROWS`)."""
    rows = TUNED_ROWS if rows is None else rows
    groups = {s: layers[: max(1, math.ceil(SAMPLE_BYTES / (4 * s[0] * s[1])))] for s, layers in _groups(model).items()}
    times: dict[Shape, list[list[float]]] = {s: [[] for _ in range(rows)] for s in groups}
    counts = list(range(1, rows + 1))
    with torch.inference_mode():
        inputs = {(s, m): torch.randn(m, s[1]) for s in groups for m in counts}
        for rep in range(reps + 1):  # the first: warm-up
            for m in counts if rep % 2 == 0 else counts[::-1]:
                for s, layers in groups.items():
                    x = inputs[(s, m)]
                    t0 = time.perf_counter()
                    for layer in layers:
                        torch.nn.functional.linear(x, layer.weight, layer.bias)
                    if rep:
                        times[s][m - 1].append(time.perf_counter() - t0)
    seconds = {s: [min(t) for t in per_m] for s, per_m in times.items()}  # (a pass is only ever slowed)
    table = RowPadding({s: choose_rows(sec, margin) for s, sec in seconds.items()})
    return table, {f"{o}x{i}": sec for (o, i), sec in seconds.items()}


def _key(model: torch.nn.Module) -> str:
    from .device import cpu_model

    shapes = sorted(_groups(model))
    text = json.dumps([VERSION, cpu_model(), torch.get_num_threads(), torch.__version__, TUNED_ROWS, shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_TABLES: weakref.WeakKeyDictionary[Any, RowPadding] = weakref.WeakKeyDictionary()
_LINEARS: weakref.WeakKeyDictionary[Any, list[torch.nn.Linear]] = weakref.WeakKeyDictionary()


def _eligible(model: Any) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return (bool(weights) and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
            and sum(w.numel() * 4 for w in weights) >= MIN_BYTES)  # fmt: skip


def row_padding(model: Any) -> RowPadding:
    """`model`'s table: cached in this process, else on disk, else measured now (a few seconds,
    once per machine and model shape; logged). `NONE` where nothing is padded."""
    if not isinstance(model, torch.nn.Module):
        return NONE
    if model in _TABLES:
        return _TABLES[model]
    table = NONE
    if _eligible(model):
        from .models import cache_dir

        path = cache_dir() / "row_padding" / f"{_key(model)}.json"
        try:
            table = RowPadding.from_dict(json.loads(path.read_text())["targets"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or not a table
            start = time.perf_counter()
            tqdm.write("adactl: measuring this CPU's float32 linear layers at 1-32 rows, once for this machine "
                       "and model shape (a few seconds)", file=sys.stderr)  # fmt: skip (above any progress bar)
            table, seconds = measure(model)
            log.info("measured the row padding in %.1f s (%s)", time.perf_counter() - start, path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                from .device import cpu_model

                record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "targets": table.to_dict(), "seconds": seconds}  # fmt: skip
                tmp = path.with_suffix(f".{os.getpid()}.tmp")  # (two processes may measure at once)
                tmp.write_text(json.dumps(record))
                tmp.replace(path)
            except OSError as e:  # a read-only cache: measured again by the next process
                log.warning("adactl: could not cache the row padding at %s: %s", path, e)
    _TABLES[model] = table
    return table


def set_row_padding(model: Any, table: RowPadding) -> None:
    """Use `table` for `model` from now on (A/B scripts: `NONE` turns the padding off)."""
    _TABLES[model] = table


def padded_linears(model: Any, rows: int | None = None) -> AbstractContextManager[None]:
    """Inside: `model`'s linear layers compute their inputs' rows as its table says, the padding
    (zero rows) dropped from their outputs; each real row's result is the unpadded one up to
    float rounding (the kernel's blocking differs). `rows`: the rows the forwards inside compute,
    if known (nothing to pad: no hooks, a shared no-op context)."""
    table = _TABLES.get(model, NONE) if isinstance(model, torch.nn.Module) else NONE
    if not table.targets or (rows is not None and not table.pads(rows)):
        return _UNPADDED
    if model not in _LINEARS:
        _LINEARS[model] = [m for layers in _groups(model).values() for m in layers]
    w = _LINEARS[model][0].weight
    if w.device.type != "cpu" or w.dtype != torch.float32:  # (read at each call: the model may have moved since)
        return _UNPADDED
    return _padded(model, table)


_UNPADDED = nullcontext()


@contextmanager
def _padded(model: torch.nn.Module, table: RowPadding) -> Iterator[None]:
    shapes: list[torch.Size | None] = []  # per layer call in progress: its input's shape (None: not padded)

    def pad(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        rows = x.numel() // x.shape[-1]
        target = table.rows(rows, (module.out_features, module.in_features))
        if target == rows:
            shapes.append(None)
            return None
        shapes.append(x.shape)
        flat = x.reshape(rows, x.shape[-1])
        return (torch.cat([flat, flat.new_zeros(target - rows, flat.shape[1])]), *args[1:])

    def cut(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        shape = shapes.pop() if shapes else None
        if shape is None:
            return None
        return out[: math.prod(shape[:-1])].reshape(*shape[:-1], out.shape[-1])

    handles = [h for m in _LINEARS[model] for h in (m.register_forward_pre_hook(pad), m.register_forward_hook(cut))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
