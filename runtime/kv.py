"""The one place where adactl touches a model's KV cache.

`BatchKV` keeps one rectangular cache for a batch of rows (one row per request) and hands
Hugging Face models a `transformers.Cache` whose layers write into preallocated buffers in
place (no `torch.cat` of the whole cache every step, as `DynamicCache` does).

How rows stay independent in one rectangle:
- a forward runs on a contiguous range of rows and writes its T new columns at the widest
  *used* width of that range (`used [rows]`); rows outside the range are untouched, so
  prefill groups of different rows share columns and deferred rows collect no holes;
- a per-row boolean `valid [rows, cols]` says which columns hold a real token of that row;
  padding slots and rejected draft tokens are *holes* (valid = False), never attended to,
  and no column at or beyond a row's used width is ever valid;
- positions come from `lengths [rows]` (the number of real tokens a row has cached), never
  from the column index, and the attention mask is an explicit 4-D boolean mask built here,
  so column order inside a row does not matter (keys are stored already rotated). A range
  with no holes and no padding uses the model's own causal mask (SDPA's fast path).

Compaction packs each row's real tokens to the left when holes waste too much; finished
rows are dropped by moving the last rows into their place; capacity shrinks back to zero
when the batch empties, so KV memory returns to its starting level. With graphs a cache
keeps its capacity instead (over a drain too) and grows geometrically: graphs hold its
buffers, and each reallocation would capture them again. `reserve(rows, cols)` allocates a
capacity up front and never gives it back (`Engine.reserve`: a server's largest batch, so a
growing batch drops no graph).

The bookkeeping (`valid`, `lengths`, `used`) lives on the host, whatever the cache's device:
every decision about where a forward writes, what a rollback keeps and when to compact is
taken without waiting for the device, and each forward sends the device only the mask rows
it needs. (A CUDA step then synchronises once, when the verdicts come back.) It is kept in
numpy arrays, as vLLM's input batch keeps its host state: an operation on a few dozen
numbers costs well under a microsecond there and several in torch, and a step makes dozens.

Static forwards (`adactl.runtime.graphs`): with `static=` buckets, forwards that fit a
bucket write at per-row column indices held in a tensor and attend over the whole column
capacity, so their shapes and buffers do not change from step to step and CUDA graphs can
replay them (`graphs=`); the bookkeeping above is the same for both kinds of forward.

Not here: what the tokens are, sampling, or which rows run (that is the engine's job).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from .attention import gqa_attention
from .graphs import CudaGraphs, StaticShapes, owner_key


@dataclass(frozen=True)
class KVConfig:
    """Growth and compaction policy of a `BatchKV`."""

    col_headroom: float = 0.0625
    """Extra column capacity, as a fraction of what is needed, allocated on growth."""
    min_col_growth: int = 16
    """Columns added at least when the buffers grow (one O(cache) copy per growth, where
    `DynamicCache` copies the whole cache every step)."""
    row_headroom: float = 0.25
    """Extra row capacity, as a fraction of what is needed, allocated on growth."""
    compact_waste: float = 0.25
    """Compact when more than this fraction of the used columns can be dropped."""
    min_compact_cols: int = 32
    """Never compact a cache narrower than this many columns (not worth the copy)."""


class _BufferLayer(DynamicLayer):
    """One attention layer's keys and values in buffers `[rows_cap, H_kv, cols_cap, D]`.

    `update` writes the new states at column `store.write_col` of rows `[first_row, first_row + n)`
    and returns views `[n, H_kv, write_col + T, D]` of the buffers: nothing is copied but the
    new states.
    """

    def __init__(self, store: BatchKV) -> None:
        super().__init__()
        self._store = store
        self.k_buf: torch.Tensor | None = None  # [rows_cap, H_kv, cols_cap, D]
        self.v_buf: torch.Tensor | None = None  # [rows_cap, H_kv, cols_cap, D]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, cols = self._store.capacity
        # zeros, not empty: a hole is masked out, but NaN garbage would still poison P @ V
        self.k_buf = key_states.new_zeros(rows, key_states.shape[1], cols, key_states.shape[3])
        self.v_buf = value_states.new_zeros(rows, value_states.shape[1], cols, value_states.shape[3])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.k_buf is not None and self.v_buf is not None
        if self._store.write_index is not None:  # a static forward: per-row columns from a tensor
            rows, cols = self._store.write_rows, self._store.write_index  # [n, T] each
            assert rows is not None
            self.k_buf.transpose(1, 2).index_put_((rows, cols), key_states.transpose(1, 2))
            self.v_buf.transpose(1, 2).index_put_((rows, cols), value_states.transpose(1, 2))
            self.keys, self.values = self.k_buf[: rows.shape[0]], self.v_buf[: rows.shape[0]]
            return self.keys, self.values
        r0, n, t = self._store.first_row, key_states.shape[0], key_states.shape[2]
        c = self._store.write_col
        self.k_buf[r0 : r0 + n, :, c : c + t] = key_states
        self.v_buf[r0 : r0 + n, :, c : c + t] = value_states
        self.keys = self.k_buf[r0 : r0 + n, :, : c + t]
        self.values = self.v_buf[r0 : r0 + n, :, : c + t]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._store.write_col

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers >= 5.2x passes the query length; 5.0 and 5.1 pass its cache positions
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        if self._store.write_index is not None:
            return self._store.capacity[1], 0
        return self._store.write_col + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BatchKV layers are edited through BatchKV, not crop()")

    def resize(self, rows: int, cols: int, n_rows: int, n_cols: int) -> None:
        """Reallocate to `[rows, H, cols, D]`, keeping the used block `[:n_rows, :, :n_cols]`.
        The rest is zeroed (a hole's value is multiplied by a zero weight, and garbage could be
        NaN), but not the block that is copied over: at batch 64 of the default pair (0.9 GB)
        writing zeros under the copy made a growth 140 ms instead of 90."""
        if not self.is_initialized:
            return
        assert self.k_buf is not None and self.v_buf is not None
        for name in ("k_buf", "v_buf"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_empty(rows, old.shape[1], cols, old.shape[3])
            n, s = min(n_rows, rows), min(n_cols, cols)
            new[:n, :, :s] = old[:n, :, :s]
            new[n:].zero_()
            new[:n, :, s:].zero_()
            setattr(self, name, new)
        self.keys = self.values = None

    def release(self) -> None:
        self.k_buf = self.v_buf = None
        self.keys = self.values = None
        self.is_initialized = False

    def nbytes(self) -> int:
        if self.k_buf is None or self.v_buf is None:
            return 0
        return self.k_buf.numel() * self.k_buf.element_size() * 2


class BatchKV:
    """A batch of per-request KV caches for one model, in one rectangle with holes.

    Invariants (`n = n_rows`; the three bookkeeping arrays are numpy, on the host):
    - `valid[r]` marks row r's real tokens, only in columns `< used[r]`;
    - `lengths[r] == valid[r].sum()` (the position id of row r's next token);
    - `n_cols == max(used[:n])`; rows `>= n` hold nothing anyone reads.
    """

    def __init__(
        self,
        num_layers: int,
        device: torch.device | str = "cpu",
        config: KVConfig | None = None,
        static: StaticShapes | None = None,
        graphs: CudaGraphs | None = None,
    ):
        self.config = config or KVConfig()
        self.static = static  # buckets for static forwards (None: every forward is eager)
        self.graphs = graphs  # replays static forwards as CUDA graphs (None: run them eagerly)
        self.write_rows: torch.Tensor | None = None  # [n, T] during a static forward
        self.write_index: torch.Tensor | None = None  # [n, T] during a static forward
        self.static_forwards = 0  # forwards run in a bucket (the rest ran eagerly)
        self.owner = owner_key()  # names this cache's graphs (never reused, unlike id(self))
        self.device = torch.device(device)
        self.layers = [_BufferLayer(self) for _ in range(num_layers)]
        self.cache = Cache(layers=list(self.layers))  # what the model sees
        self.n_rows = 0
        self.n_cols = 0
        self.capacity = (0, 0)  # (rows, cols) allocated
        self.reserved = (0, 0)  # (rows, cols) capacity never given back (`reserve`)
        self.valid = np.zeros((0, 0), dtype=bool)  # [rows_cap, cols_cap], on the host
        self.lengths = np.zeros(0, dtype=np.int64)  # [rows_cap], on the host
        self.used = np.zeros(0, dtype=np.int64)  # [rows_cap], on the host
        self.first_row = 0  # row range start of the forward in progress
        self.write_col = 0  # first column written by the forward in progress
        self._last_end: int | None = None  # end column of the last forward (None after compaction)

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (all layers, including headroom and holes)."""
        return sum(layer.nbytes() for layer in self.layers)

    def cached_tokens(self) -> int:
        """Real tokens held, summed over rows."""
        return int(self.lengths[: self.n_rows].sum())

    def row_lengths(self) -> torch.Tensor:
        """`[n_rows]` real tokens cached per row (= position id of the row's next token)."""
        return torch.from_numpy(self.lengths[: self.n_rows])

    def _ensure(self, rows: int, cols: int) -> None:
        cap_rows, cap_cols = self.capacity
        if rows <= cap_rows and cols <= cap_cols:
            return
        cfg = self.config
        # with graphs a growth re-captures this cache's graphs: grow geometrically, so a
        # cache grows a few times in its life and then replays
        double = self.graphs is not None
        if rows > cap_rows:
            cap_rows = max(rows + max(4, int(rows * cfg.row_headroom)), 2 * cap_rows if double else 0)
            if double and self.static is not None and rows <= self.static.rows[-1]:
                cap_rows = min(cap_rows, self.static.rows[-1])  # past the largest bucket forwards are eager
        if cols > cap_cols:
            grown = self._round_cols(cols + max(cfg.min_col_growth, int(cols * cfg.col_headroom)))
            cap_cols = max(grown, 2 * cap_cols if double else 0)
        self._reallocate(cap_rows, cap_cols)

    def reserve(self, rows: int, cols: int) -> None:
        """Capacity for `rows` rows of `cols` used columns now (static: plus scratch, in whole
        column blocks), and never less from now on: no growth below it, no shrinking on
        compaction or a drain (the buffers are kept, as with graphs). A server that knows its
        largest batch and context reserves them once, and its graphs are never dropped for a
        growth. `close` gives it up."""
        if rows < 0 or cols < 0:
            raise ValueError(f"a reservation is rows >= 0 and cols >= 0, got ({rows}, {cols})")
        self.reserved = (max(rows, self.reserved[0]), max(self._round_cols(cols + self._scratch()), self.reserved[1]))
        want = (max(self.reserved[0], self.capacity[0]), max(self.reserved[1], self.capacity[1]))
        if want != self.capacity:
            self._reallocate(*want)

    def _round_cols(self, cols: int) -> int:
        """A column capacity: as asked, or with static forwards, in whole blocks."""
        if self.static is None:
            return cols
        return -(-cols // self.static.col_block) * self.static.col_block

    def _scratch(self) -> int:
        return self.static.scratch if self.static is not None else 0

    def _fits(self, rows: int, cols: int) -> None:
        """Make room for `rows` rows and `cols` used columns (plus scratch, when static)."""
        self._ensure(rows, cols + self._scratch())

    def _reallocate(self, rows: int, cols: int) -> None:
        if self.graphs is not None:
            self.graphs.drop(self.owner)  # their buffers are about to go
        n, s = self.n_rows, self.n_cols
        for layer in self.layers:
            layer.resize(rows, cols, n, s)
        valid = np.zeros((rows, cols), dtype=bool)
        valid[:n, :s] = self.valid[:n, :s]
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[:n] = self.lengths[:n]
        used = np.zeros(rows, dtype=np.int64)
        used[:n] = self.used[:n]
        self.valid, self.lengths, self.used, self.capacity = valid, lengths, used, (rows, cols)

    def close(self) -> None:
        """Free the buffers and every graph of this cache (it holds no rows afterwards; a
        later forward allocates again)."""
        if self.graphs is not None:
            self.graphs.drop(self.owner)
        for layer in self.layers:
            layer.release()
        self.n_rows = self.n_cols = 0
        self._last_end = None
        self.capacity = self.reserved = (0, 0)
        self.valid = np.zeros((0, 0), dtype=bool)
        self.lengths = np.zeros(0, dtype=np.int64)
        self.used = np.zeros(0, dtype=np.int64)

    def _empty(self) -> None:
        """No rows, the buffers kept (their graphs stay valid)."""
        self.valid.fill(False)
        self.lengths.fill(0)
        self.used.fill(0)
        self.n_rows = self.n_cols = 0
        self._last_end = None

    def _drained(self) -> None:
        """The last row left: memory back to zero, or if this cache holds graphs or a
        reservation, kept for the next burst (its graphs replay then instead of being captured
        again)."""
        if self._holds_graphs() or self.reserved != (0, 0):
            self._empty()
        else:
            self.close()

    def clear(self) -> None:
        """Drop every row, whatever state a forward that raised left them in: as a drain does
        (buffers and graphs kept where they are held, so a server's next step replays), else
        closed."""
        self.write_rows = self.write_index = None
        self.first_row = self.write_col = 0
        self._drained()

    def _holds_graphs(self) -> bool:
        return self.graphs is not None and self.owner in self.graphs.owners()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the cache's device, without waiting for the device (pinned,
        asynchronous copy on CUDA)."""
        if x.device == self.device:
            return x
        if self.device.type == "cuda":
            # contiguous first: pinning a view with repeated elements (an `expand`) fails
            return x.contiguous().pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        new_valid: torch.Tensor | None,
        parents: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        first_row: int = 0,
        context: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        feature_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Run `model` on new tokens for rows `[first_row, first_row + n)` (default: the first n)
        and cache their keys and values. Other rows are untouched.

        input_ids: [n, T] token ids; padding slots may hold any id.
        new_valid: [n, T] bool, True for a real token; False slots become holes (None: every
                   slot is a real token, with no host array to read). This and
                   `parents`, `context`, `positions` are best given on the CPU: the cache's
                   bookkeeping is there (on the device, they cost a wait for it).
        parents:   [n, T] long or None. None = each row's real tokens form a chain after its
                   context (padding on either side). Otherwise a token tree: parent index of
                   each slot within the row (-1 = attached to the row's context), parents[i] < i.
        context:   [n, T, C] bool or None: the cached columns `[0, C)` each new token attends to
                   (columns from C on: none), instead of every real token of its row. For a
                   tree grown over several forwards, whose earlier levels are cached but must
                   be seen only by their descendants (`next_col` says where a forward writes).
        positions: [n, T] long position ids, required with `context` (default: the row's
                   real tokens + depth in the tree).
        feature_fn: what a feature draft reads of the target's hidden states (its
                   `target_features`): applied inside the forward, so the output holds
                   `.features` [n, T, H] and no hidden state of any layer (a CUDA graph would
                   keep every layer's alive as its outputs: 33 x [rows, tokens, 4096] per
                   bucket at the 8B shape).
        Returns the model output (`.logits` is [n, T, V], or the last `logits_to_keep`;
        with `feature_fn`, a `Features` of logits and features).
        """
        n, t = input_ids.shape
        r0, r1 = first_row, first_row + n
        if r0 < 0 or r1 > self.n_rows or n == 0:
            raise ValueError(f"forward on rows [{r0}, {r1}) but the cache holds {self.n_rows} rows")
        nv = new_valid.cpu().numpy() if new_valid is not None else None  # (None: all real)
        parents = parents.cpu() if parents is not None else None
        input_ids = self._to_device(input_ids)
        bucket = self.static.bucket(n, t) if self.static is not None else None
        if bucket is not None and r0 == 0 and context is None:
            return self._static_forward(model, input_ids, nv, parents, logits_to_keep, bucket, model_kwargs, feature_fn)
        if feature_fn is not None:
            model_kwargs["output_hidden_states"] = True
        # (n_cols is the max of every row's used: no array to read for a forward on all rows)
        c = self.n_cols if r0 == 0 and r1 == self.n_rows else int(self.used[r0:r1].max())
        self._fits(self.n_rows, c + t)
        mask: torch.Tensor | None
        if context is not None:
            if positions is None:
                raise ValueError("forward with an explicit context needs explicit positions")
            ancestors, _ = _tree_structure(nv, parents, n, t)
            seen = torch.zeros(n, t, c, dtype=torch.bool)
            seen[:, :, : context.shape[2]] = context[:, :, :c].cpu()
            mask = self._to_device(torch.cat([seen, ancestors], dim=2)[:, None])
            positions = self._to_device(positions)
        elif parents is None and (nv is None or nv.all()) and min(self.lengths[r0:r1].tolist()) == c:  # (lengths <= c)
            # no holes and no padding: the model's own causal mask (and SDPA's fast causal
            # path, which an explicit mask would rule out) is exactly right
            mask = None
            positions = torch.arange(c, c + t, device=self.device).expand(n, t).contiguous()
        elif t == 1 and parents is None and (nv is None or nv.all()):
            # one real token a row (a decode or draft step over rows with holes): it sees its
            # row's real tokens and itself, at the position after them; built in one host array
            sees = np.empty((n, c + 1), dtype=bool)
            sees[:, :c] = self.valid[r0:r1, :c]
            sees[:, c] = True
            mask = self._to_device(torch.from_numpy(sees))[:, None, None]  # [n, 1, 1, c + 1]
            positions = self._to_device(torch.from_numpy(self.lengths[r0:r1, None].copy()))
        else:
            ancestors, depth = _tree_structure(nv, parents, n, t)
            positions = self._to_device(torch.from_numpy(self.lengths[r0:r1, None]) + depth)  # [n, T]
            context = self._to_device(torch.from_numpy(self.valid[r0:r1, :c]))[:, None].expand(n, t, c)  # [n, T, c]
            mask = torch.cat([context, self._to_device(ancestors)], dim=2)[:, None]  # [n, 1, T, c + T]
        self.first_row, self.write_col = r0, c
        try:
            with gqa_attention(model, self.device, mask is not None, t):  # masked GQA without copying key/value heads
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    **cache_kwargs(model, self.cache),
                    use_cache=True,
                    logits_to_keep=logits_to_keep,
                    **model_kwargs,
                )
        finally:
            self.first_row = self.write_col = 0
        self._wrote(r0, nv, c, n, t)
        return _with_features(out, feature_fn)

    def _wrote(self, r0: int, new_valid: np.ndarray | None, c: int, n: int, t: int) -> None:
        """Bookkeeping after a forward wrote rows [r0, r0 + n) at columns [c, c + T) (host;
        new_valid None: every slot real, so no array is read)."""
        if new_valid is None:
            self.valid[r0 : r0 + n, c : c + t] = True
            self.lengths[r0 : r0 + n] += t
        else:
            self.valid[r0 : r0 + n, c : c + t] = new_valid
            self.lengths[r0 : r0 + n] += new_valid.sum(1)
        self.used[r0 : r0 + n] = c + t
        self.n_cols = max(self.n_cols, c + t)
        self._last_end = c + t

    def _static_forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        nv: np.ndarray | None,
        parents: torch.Tensor | None,
        logits_to_keep: int,
        bucket: tuple[int, int],
        model_kwargs: dict[str, Any],
        feature_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
    ) -> Any:
        """`forward` on rows [0, n) as a (rows, tokens) bucket: the same tokens, mask and
        positions, padded; writes at column indices from a tensor; replayed as a CUDA graph
        when `graphs` is set (module docstring)."""
        n, t = input_ids.shape
        bn, bt = bucket
        c = int(self.used[:n].max())
        self._fits(max(self.n_rows, bn), c + bt)
        cap, dev = self.capacity[1], self.device
        assert self.static is not None and bt <= self.static.scratch
        slots = torch.arange(bt)
        write = torch.empty(bn, bt, dtype=torch.long)
        write[:n] = c + slots  # real rows: where eager would write
        write[n:] = cap - self.static.scratch + slots  # padding rows: scratch, never valid
        write = self._to_device(write)
        ancestors, depth = _tree_structure(nv, parents, n, t)
        ids = torch.zeros(bn, bt, dtype=torch.long, device=dev)
        ids[:n, :t] = input_ids
        positions = torch.zeros(bn, bt, dtype=torch.long)
        positions[:n, :t] = torch.from_numpy(self.lengths[:n, None]) + depth
        positions = self._to_device(positions)
        mask = torch.zeros(bn, 1, bt, cap, dtype=torch.bool, device=dev)
        mask[:n, 0, :t, :c] = self._to_device(torch.from_numpy(self.valid[:n, None, :c]))
        mask[:n, 0, :t, c : c + t] = self._to_device(ancestors)
        mask.scatter_(3, write[:, None, :, None], True)  # every slot sees itself: padding stays finite
        inputs = {"ids": ids, "positions": positions, "mask": mask, "write": write,
                  "rows": torch.arange(bn, device=dev)[:, None].expand(bn, bt).contiguous()}  # fmt: skip
        flags = {k: v for k, v in model_kwargs.items() if not isinstance(v, torch.Tensor)}
        if feature_fn is not None:
            flags["output_hidden_states"] = True
        for name, value in model_kwargs.items():
            if isinstance(value, torch.Tensor):  # per-token inputs (a feature draft's features)
                inputs[name] = value.new_zeros(bn, bt, *value.shape[2:])
                inputs[name][:n, :t] = value

        def run(x: dict[str, torch.Tensor]) -> Any:
            # everything step-dependent comes from `x`: a replay reruns this with the values of
            # its capture (write_col stays 0: a static forward writes at `write`, masks over the
            # capacity, and takes positions as given)
            self.write_rows, self.write_index = x["rows"], x["write"]
            try:
                tensors = {k: v for k, v in x.items() if k not in ("ids", "positions", "mask", "write", "rows")}
                with gqa_attention(model, dev, True, bt):
                    out = model(
                        input_ids=x["ids"], attention_mask=x["mask"], position_ids=x["positions"],
                        **cache_kwargs(model, self.cache), use_cache=True, **flags, **tensors,
                    )  # fmt: skip
                # with a feature draft, only its features leave the graph (every layer's hidden
                # states would stay alive as the graph's outputs)
                return _with_features(out, feature_fn)
            finally:
                self.write_rows = self.write_index = None
                self.write_col = 0

        if self.graphs is not None:
            reads = getattr(feature_fn, "__self__", feature_fn)  # (a bound method is a new object each time)
            shape = (id(model), bn, bt, tuple(sorted(flags.items())), tuple(inputs), id(reads) if reads else None)
            out = self.graphs.run((self.owner, cap, self.capacity[0], *shape), run, inputs, shape)
        else:
            out = run(inputs)
        self._wrote(0, nv, c, n, t)
        self.static_forwards += 1
        # a graph's outputs are overwritten by its next replay (and in a shared pool by an
        # earlier-captured graph's): the logits callers hold are copies; hidden states are read
        # before the next forward (the target's features, a feature draft's next input)
        return _Rows(out, n, t - logits_to_keep if logits_to_keep else 0, t, copy=self.graphs is not None)

    def used_cols(self, first_row: int, n: int) -> torch.Tensor:
        """[n] (host) the used width of rows `[first_row, first_row + n)`: where their next token goes
        at the earliest."""
        return torch.from_numpy(self.used[first_row : first_row + n].copy())

    def visible_before(self, start: torch.Tensor, width: int, first_row: int = 0) -> torch.Tensor:
        """[n, width] bool (host): row i's real tokens in columns below `start[i]` (its context without
        anything cached from column `start[i]` on)."""
        n = len(start)
        cols = np.arange(width)[None, :]
        return torch.from_numpy(self.valid[first_row : first_row + n, :width] & (cols < start.cpu().numpy()[:, None]))

    def drop_from(self, start: torch.Tensor, first_row: int = 0) -> None:
        """Forget every token of rows `[first_row, first_row + n)` cached at column >= `start[i]`
        (the scratch levels of a draft tree): they become holes, and trailing holes are cut off."""
        n = len(start)
        rows = slice(first_row, first_row + n)
        width = int(self.used[rows].max()) if n else 0
        if width == 0:
            return
        cols = np.arange(width)[None, :]
        drop = self.valid[rows, :width] & (cols >= start.cpu().numpy()[:, None])
        self.lengths[rows] -= drop.sum(1)
        self.valid[rows, :width] &= ~drop
        self._trim_trailing_holes(rows)
        self._last_end = None

    def next_col(self, first_row: int, n: int) -> int:
        """The column the next forward on rows `[first_row, first_row + n)` writes its first token to."""
        return int(self.used[first_row : first_row + n].max())

    @property
    def last_end(self) -> int | None:
        """The column where the last forward's writes ended (None after a compaction)."""
        return self._last_end

    def keep_last(self, keep: torch.Tensor, first_row: int = 0, end: int | None = None) -> None:
        """Keep only `keep [n, W]` (best on the CPU) of the W columns that end where the last
        forward ended (or at column `end`, for the rows of an earlier forward whose columns no
        forward wrote since), for rows `[first_row, first_row + n)`: rollback of rejected tokens.

        A rejected draft token becomes a hole; nothing is copied. Holes at the end of a row are
        then cut off (the row's `used` shrinks to its last real column), so the next forward
        writes over them: a row whose rejections are all trailing, as in a chain, keeps no hole
        at all (at batch 1 the cache stays dense and needs no mask and no compaction). W may
        span a chain of forwards on shrinking row ranges (a draft), as long as nothing
        compacted in between.
        """
        n, w = keep.shape
        keep_np = keep.cpu().numpy()
        end = end if end is not None else self._last_end
        if end is None or w > end:
            raise ValueError(f"keep_last over {w} columns, but the last forward ended at column {end}")
        rows = slice(first_row, first_row + n)
        block = self.valid[rows, end - w : end]
        self.lengths[rows] -= (block & ~keep_np).sum(1)
        block &= keep_np
        self._trim_trailing_holes(rows)

    def _trim_trailing_holes(self, rows: slice) -> None:
        """Shrink each row's `used` to its last real column, so the next forward writes over
        the holes at its end. The last `TRIM_WINDOW` columns are searched first (a rollback's
        holes sit there), the whole width only for rows with no real column in them."""
        width = int(self.used[rows].max(initial=0))
        if width > 0:
            lo = max(0, width - TRIM_WINDOW)
            in_window = _last_true(self.valid[rows, lo:width])
            last_real = np.where(in_window > 0, in_window + lo, 0)
            far = np.flatnonzero(in_window == 0)  # (none in the window: the columns before it)
            if len(far) and lo > 0:
                last_real[far] = _last_true(self.valid[rows][far, :lo])
            self.used[rows] = np.minimum(self.used[rows], last_real)
        self.n_cols = int(self.used[: self.n_rows].max(initial=0))

    def reserve_rows(self, rows: int) -> None:
        """Make room for `rows` rows exactly (no headroom), e.g. before a known batch joins;
        with graphs, as a growth does (geometrically: each reallocation captures again)."""
        if rows > self.capacity[0]:
            if self.graphs is not None:
                self._ensure(rows, self.capacity[1])
            else:
                self._reallocate(rows, self.capacity[1])

    def new_rows(self, count: int) -> None:
        """Append `count` empty rows (e.g. requests about to be prefilled)."""
        self._fits(self.n_rows + count, self.n_cols)
        new = slice(self.n_rows, self.n_rows + count)
        self.valid[new] = False
        self.lengths[new] = 0
        self.used[new] = 0
        self.n_rows += count

    # ------------------------------------------------------------------- rows
    def add_row(self, src: BatchKV, row: int = 0) -> int:
        """Append row `row` of another cache (e.g. a finished prefill) as the last row here,
        packed left (its holes are not copied)."""
        if len(src.layers) != len(self.layers):
            raise ValueError("caches of different models cannot be merged")
        return self._append(src._packed(row), int(src.lengths[row]))

    def row_to_host(self, row: int) -> HostRow:
        """A copy of row `row`'s keys and values in host memory, packed left (on CUDA, pinned
        and queued on the stream without waiting for it; the row itself is not touched)."""
        layers = self._packed(row)
        if self.device.type == "cuda":
            layers = [kv if kv is None else tuple(_pinned_copy(x) for x in kv) for kv in layers]  # type: ignore[misc]
        else:  # (a copy either way: the CPU's own memory, or from another device's)
            layers = [kv if kv is None else (kv[0].to("cpu", copy=True), kv[1].to("cpu", copy=True)) for kv in layers]
        return HostRow(layers, int(self.lengths[row]))

    def add_host_row(self, host: HostRow) -> int:
        """Append a row copied out by `row_to_host` (of a cache of the same model) as the last row."""
        if len(host.layers) != len(self.layers):
            raise ValueError("caches of different models cannot be merged")
        layers = [kv if kv is None else (self._to_device(kv[0]), self._to_device(kv[1])) for kv in host.layers]
        return self._append(layers, host.length)

    def _packed(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Row `row`'s keys and values per layer, [H_kv, length, D] each, its holes left out
        (None for a layer never written)."""
        cols = self._to_device(torch.from_numpy(np.flatnonzero(self.valid[row, : int(self.used[row])])))
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for layer in self.layers:
            if not layer.is_initialized or layer.k_buf is None or layer.v_buf is None:
                out.append(None)
                continue
            out.append((layer.k_buf[row, :, cols], layer.v_buf[row, :, cols]))
        return out

    def _append(self, layers: list[tuple[torch.Tensor, torch.Tensor] | None], length: int) -> int:
        """Append a row holding `length` tokens of keys and values ([H_kv, length, D] per layer)."""
        dst = self.n_rows
        self._fits(dst + 1, max(self.n_cols, length))
        for mine, kv in zip(self.layers, layers):
            if kv is None:
                continue
            if not mine.is_initialized:
                mine.lazy_initialization(kv[0][None], kv[1][None])
            assert mine.k_buf is not None and mine.v_buf is not None
            mine.k_buf[dst, :, :length] = kv[0]
            mine.v_buf[dst, :, :length] = kv[1]
        self.valid[dst] = False
        self.valid[dst, :length] = True
        self.lengths[dst] = self.used[dst] = length
        self.n_cols = max(self.n_cols, length)
        self.n_rows = dst + 1
        return dst

    def permute(self, order: list[int]) -> None:
        """Keep rows `order` (old indices), in that order; rows not listed are dropped.

        Only rows that change place are copied, so dropping a row moves one row.
        """
        if sorted(set(order)) != sorted(order) or any(not 0 <= i < self.n_rows for i in order):
            raise ValueError(f"bad row order {order} for {self.n_rows} rows")
        moves = [(src, dst) for dst, src in enumerate(order) if src != dst]
        if moves:
            src_idx = torch.tensor([m[0] for m in moves])
            dst_idx = torch.tensor([m[1] for m in moves])
            src_dev, dst_dev = self._to_device(src_idx), self._to_device(dst_idx)
            s = self.n_cols
            for layer in self.layers:
                if layer.k_buf is None or layer.v_buf is None:
                    continue
                layer.k_buf[dst_dev, :, :s] = layer.k_buf[src_dev, :, :s]
                layer.v_buf[dst_dev, :, :s] = layer.v_buf[src_dev, :, :s]
            for book in (self.valid, self.lengths, self.used):
                book[dst_idx.numpy()] = book[src_idx.numpy()]
        self.n_rows = len(order)
        if self.n_rows == 0:
            self._drained()
            return
        self.n_cols = int(self.used[: self.n_rows].max())
        self.maybe_compact()

    # ------------------------------------------------------------- compaction
    def maybe_compact(self) -> bool:
        """Pack rows left and shrink capacity when holes or spare capacity waste too much."""
        cfg = self.config
        n = self.n_rows
        if n == 0:
            return False
        width = int(self.lengths[:n].max())
        compacted = False
        if self.n_cols >= cfg.min_compact_cols and self.n_cols - width > cfg.compact_waste * self.n_cols:
            self._compact(width)
            compacted = True
        # give back spare capacity (finished rows, a width that compaction shrank), with
        # hysteresis so that rows leaving one by one do not reallocate every time
        rows_cap, cols_cap = self.capacity
        bucket = self.static.bucket(n, 1) if self.static is not None else None
        need = bucket[0] if bucket is not None else n  # static forwards pad the rows to their bucket
        too_many_rows = rows_cap > need + max(8, need // 2)
        too_many_cols = cols_cap > self.n_cols + self._scratch() + max(4 * cfg.min_col_growth, self.n_cols // 2)
        if (too_many_rows or too_many_cols) and not self._holds_graphs():  # with graphs: kept (no re-capture)
            rows = need + need // 8 if too_many_rows else rows_cap
            cols = self._round_cols(self.n_cols + cfg.min_col_growth + self._scratch()) if too_many_cols else cols_cap
            rows, cols = max(rows, self.reserved[0]), max(cols, self.reserved[1])  # never below a reservation
            if (rows, cols) != self.capacity:
                self._reallocate(rows, cols)
        return compacted

    def pack(self) -> bool:
        """Pack every row's real tokens left now, however few holes there are (`maybe_compact`
        waits until they waste `compact_waste` of the columns); True if anything moved."""
        n = self.n_rows
        width = int(self.lengths[:n].max()) if n else 0
        if n == 0 or self.n_cols <= width:
            return False
        self._compact(width)
        return True

    def _compact(self, width: int) -> None:
        n, s = self.n_rows, self.n_cols
        valid = self.valid[:n, :s]
        # stable sort puts each row's real columns first, in their order: [n, S]
        order_np = np.ascontiguousarray(np.argsort(~valid, axis=1, kind="stable")[:, :width])
        order = self._to_device(torch.from_numpy(order_np))
        for layer in self.layers:
            if layer.k_buf is None or layer.v_buf is None:
                continue
            h, d = layer.k_buf.shape[1], layer.k_buf.shape[3]
            index = order[:, None, :, None].expand(n, h, width, d)
            layer.k_buf[:n, :, :width] = torch.gather(layer.k_buf[:n, :, :s], 2, index)
            layer.v_buf[:n, :, :width] = torch.gather(layer.v_buf[:n, :, :s], 2, index)
        cols = np.arange(self.capacity[1])
        self.valid[:n] = cols[None, :] < self.lengths[:n, None]
        self.used[:n] = self.lengths[:n]
        self.n_cols = width
        self._last_end = None


@dataclass
class HostRow:
    """One row's keys and values moved off the device (`BatchKV.row_to_host`): per layer
    [H_kv, length, D] each, packed left, in host memory."""

    layers: list[tuple[torch.Tensor, torch.Tensor] | None]
    length: int

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for kv in self.layers if kv is not None for k in kv[:1])


TRIM_WINDOW = 64  # columns `_trim_trailing_holes` searches before the whole row


def _last_true(block: np.ndarray) -> np.ndarray:
    """[n] one past each row's last True column of `block` [n, w] (0 where it has none)."""
    if block.shape[1] == 0:
        return np.zeros(len(block), dtype=np.int64)
    from_end = block[:, ::-1].argmax(1)
    last = block.shape[1] - from_end
    last[~block[np.arange(len(block)), block.shape[1] - 1 - from_end]] = 0
    return last


def _pinned_copy(x: torch.Tensor) -> torch.Tensor:
    """`x` copied into pinned host memory, asynchronously (the copy is queued on the stream)."""
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out


@dataclass
class Features:
    """A target forward's output with a feature draft's features in place of the hidden states
    of every layer (`BatchKV.forward(feature_fn=...)`)."""

    logits: torch.Tensor  # [n, T or logits_to_keep, V]
    features: torch.Tensor  # [n, T, H]


def _with_features(out: Any, feature_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None) -> Any:
    """A target forward's output as it leaves `forward`: as the model gave it, or with a feature
    draft's `feature_fn` a `Features` of its logits and the features the draft reads."""
    return out if feature_fn is None else Features(out.logits, feature_fn(out.hidden_states))


class _Rows:
    """A static forward's output cut back to its real rows and slots [:n, lo:hi] (logits,
    hidden states, a companion's logits; views of the captured outputs under CUDA graphs)."""

    def __init__(self, out: Any, n: int, lo: int, hi: int, copy: bool = False) -> None:
        def cut(x: Any, keep: bool = False, copy: bool = False) -> Any:
            if isinstance(x, torch.Tensor):
                y = x[:n, lo:hi] if keep else x[:n, :hi]
                return y.clone() if copy else y
            if isinstance(x, tuple):
                return tuple(cut(y, keep) for y in x)
            return x

        self.logits = cut(out.logits, keep=True, copy=copy)
        self.hidden_states = cut(getattr(out, "hidden_states", None))
        self.features = cut(getattr(out, "features", None))
        self.companion_logits = cut(getattr(out, "companion_logits", None), keep=True, copy=copy)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The cache as `model`'s forward takes it: `cache=` (transformers >= 5.2x, where
    `past_key_values` is deprecated, to be removed in 5.40) or `past_key_values=` (earlier 5.x)."""
    return {_cache_argument(type(model)): cache}  # type: ignore[arg-type]


@functools.cache
def _cache_argument(model_class: Any) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_CAUSAL_CACHED = 64  # widths whose masks are kept (a decode or draft step's; a prefill chunk's are not)


@functools.lru_cache(maxsize=_CAUSAL_CACHED)
def _causal(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, T] lower-triangular and identity masks on the host (read only: shared by every call)."""
    return torch.ones(t, t, dtype=torch.bool).tril(), torch.eye(t, dtype=torch.bool)


def _tree_structure(
    nv: np.ndarray | None, parents: torch.Tensor | None, n: int, t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor mask `[n, T, T]` (query i may attend to new slot j) and depth `[n, T]` of a
    forward's new slots, `nv` its new_valid on the host (None: every slot real).

    Every slot attends to itself, so padding slots stay finite; real slots attend to their
    real ancestors only.
    """
    if parents is None:
        if t == 1:  # one token a row (a decode or draft step): it sees itself, at depth 0
            return torch.ones(n, 1, 1, dtype=torch.bool), torch.zeros(n, 1, dtype=torch.long)
        tril, eye = _causal(t) if t <= _CAUSAL_CACHED else _causal.__wrapped__(t)
        if nv is None:  # every slot real, a chain: each sees the ones before it
            return tril.expand(n, t, t), torch.arange(t).expand(n, t)
        new_valid = torch.from_numpy(nv)
        ancestors = (tril[None] & new_valid[:, None, :]) | eye[None]
        depth = (new_valid.cumsum(1) - 1).clamp(min=0)
        return ancestors, depth
    new_valid = torch.from_numpy(nv) if nv is not None else torch.ones(n, t, dtype=torch.bool)
    eye = torch.eye(t, dtype=torch.bool, device=new_valid.device)
    ancestors = eye[None].repeat(n, 1, 1)
    depth = torch.zeros(n, t, dtype=torch.long, device=new_valid.device)
    rows = torch.arange(n, device=new_valid.device)
    for i in range(t):
        parent = parents[:, i]
        has_parent = (parent >= 0) & new_valid[:, i]
        p = parent.clamp(min=0)
        inherited = ancestors[rows, p] & has_parent[:, None] & new_valid
        ancestors[:, i] |= inherited
        depth[:, i] = torch.where(has_parent, depth[rows, p] + 1, 0)
    return ancestors, depth
