"""The target's half of a step: forwards over each row's last token and verified drafts, the
lossless rule on the logits' device (`adactl.runtime.verify`), the verdicts to the host in
one copy, then the target cache rolled back to what was accepted.

Rows come in draft-length order, so verify lengths mostly fall along the batch: where one
forward over the whole [rows, longest] rectangle would mostly compute padding, the rows
split into two ranges, each as wide as its own longest (`rows.verify_split`). A tree step
verifies each row's first `cut` nodes in one forward with a tree mask and keeps only the
accepted path in the cache.

Not here: which prefix to verify (the caller's cut), the draft cache (the proposer's), what
is emitted (the engine's).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from .kv import BatchKV
from .rows import Request, RowSampling, slot_parents
from .shapes import verify_split
from .steps import Drafts, Verdict
from .verify import Verifier, process_logits, verify_chains

ROW_BLOCK = 4


def whole_row_blocks(model: Any, rows: int | None = None) -> AbstractContextManager[None]:
    """On the CPU in float32, pad the input rows of the forwards' linear layers where torch's
    CPU `linear` is slow for their count, and drop the padding from the outputs (zeros; each
    real row's result is the same up to float rounding, the kernel's blocking differs).

    - Every linear layer, 2 or 3 rows (a verify forward at batch 1 with 1 or 2 draft tokens,
      plain decoding at batch 2 or 3): padded to 5 rows with two threads or more, to 4 with
      one. SmolLM2 at batch 1 over 160 cached tokens (2 threads, torch 2.13, the model alone):
      a forward of 1 token took 61 ms, of 2, 3, 4, 5 tokens 99, 124, 95, 80 ms; with its
      linear layers padded to 5 rows 81, 81, 81, 78 ms (one thread: 101, 121, 87, 99
      unpadded). In the engine (`docs/issue31/small_rows.py`, padding on and off step by step)
      3 rows gain 18–25%, 2 rows 0–17%, and 4 rows padded to 5 lost up to 7%: they stay.
    - The output layer, from 5 rows: a multiple of 4 where 2 or 3 would be left over. Its
      blocks of 4 rows are fast and a remainder of 2 or 3 slow: SmolLM2's 576 x 49,152 output
      layer took 10.5 ms for 1 row, 23.7 for 2, 39.3 for 3, 18.6 for 4, 38.7 for 7, 18.0 for 8.

    bfloat16 has no such steps (the output layer took 3.4–4.4 ms for 1 to 8 rows alike).
    `rows`: the rows the forwards inside compute logits for, if known (none to pad: no hooks,
    and a shared no-op context, not a generator's few microseconds)."""
    if rows is not None and _padded_rows(rows, True) == rows:
        return _UNPADDED
    linears = _linears(model)
    if not linears or linears[-1].weight.device.type != "cpu" or linears[-1].weight.dtype != torch.float32:
        return _UNPADDED  # (read at each call: the model may have moved since)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _padded(linears, head)


def _padded_rows(rows: int, head: bool) -> int:
    """The row count a linear layer (the output layer: `head`) computes `rows` rows as."""
    if rows in (2, 3):
        return 5 if torch.get_num_threads() > 1 else 4
    if head and rows > 4 and -rows % ROW_BLOCK in (1, 2):
        return rows + -rows % ROW_BLOCK
    return rows


_UNPADDED = nullcontext()
_LINEARS: weakref.WeakKeyDictionary[Any, list[torch.nn.Linear]] = weakref.WeakKeyDictionary()


def _linears(model: Any) -> list[torch.nn.Linear]:
    """Every `nn.Linear` of `model`, the output layer last where it is one (found once per model)."""
    if not isinstance(model, torch.nn.Module):
        return []
    if model not in _LINEARS:
        _LINEARS[model] = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return _LINEARS[model]


@contextmanager
def _padded(linears: list[torch.nn.Linear], head: Any) -> Iterator[None]:
    shapes: list[torch.Size | None] = []  # per layer call in progress: its input's shape (None: not padded)

    def pad(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        rows = x.numel() // x.shape[-1]
        target = _padded_rows(rows, module is head)
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

    handles = [h for m in linears for h in (m.register_forward_pre_hook(pad), m.register_forward_hook(cut))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rows_of(x: torch.Tensor, slots: bool = False, *, part: slice | None, width: int) -> torch.Tensor:
    """Rows `part` of a per-row tensor (and with `slots`, its first `width` slots); all of it
    where the forward covers every row (part None)."""
    if part is None:
        return x
    return x[part, :width] if slots else x[part]


class TargetVerifier:
    """Runs the target over the pending drafts of the first rows of its batch cache."""

    def __init__(
        self, model: Any, kv: Callable[[], BatchKV], device: torch.device,
        features: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None,
        verifier: Verifier, tree_verifier: Callable[..., Any],
    ) -> None:  # fmt: skip
        """features: a feature draft's `target_features` (None: no feature draft)."""
        self.model, self._kv, self.device, self.features = model, kv, device, features
        self.verifier, self.tree_verifier = verifier, tree_verifier

    def _ids(self, rows: list[Request], drafts: Drafts, t: int) -> torch.Tensor:
        """[rows, t] on the device: each row's last token, then its first t - 1 draft tokens."""
        last = torch.tensor([[r.target_pending[-1]] for r in rows]).to(self.device)  # [rows, 1]
        if t == 1:
            return last
        return torch.cat([last, drafts.tokens[:, : t - 1].clamp(min=0)], dim=1)

    def verify(self, rows: list[Request], drafts: Drafts, draft_len: torch.Tensor, cut: torch.Tensor) -> Verdict:
        """Verify the first `cut[i]` draft tokens of each row (cut, draft_len: [rows], CPU)."""
        kv, d, n = self._kv(), drafts, len(rows)
        cuts = cut.tolist()
        t, k, trees = max(cuts) + 1, d.tokens.shape[1], d.parents is not None
        extra: dict[str, Any] = {"feature_fn": self.features} if self.features is not None else {}
        if not trees and self.verifier is verify_chains and min(cuts) == t - 1:
            if all(r.sampling.temperature <= 0 for r in rows):
                return self._greedy(kv, rows, d, t, extra)
        ids = self._ids(rows, d, t)
        # the verified slots (None: every row verifies t - 1 tokens, so every slot is real)
        valid = None if min(cuts) == t - 1 else torch.arange(t)[None, :] <= cut[:, None]
        tree_parents = slot_parents(d.parents, t) if d.parents is not None else None
        s = RowSampling(rows, self.device)
        if d.parents is not None:
            uniforms = s.uniforms([int(v) + 1 for v in draft_len], k + 1)
        else:
            uniforms = s.uniforms([c + 1 for c in cuts], t)
        verdict = torch.zeros(n, 2 + k, dtype=torch.long, device=self.device) if trees else None  # accepted, next, path
        decided: list[torch.Tensor] = []  # chains: [rows of a part, 2] accepted, next
        features: torch.Tensor | None = None
        parts = verify_split(cuts)
        whole = len(parts) == 1  # one forward over every row and slot: nothing to slice
        ends: list[int] = []
        for r0, r1 in parts:
            w, part = max(cuts[r0:r1]) + 1, slice(r0, r1)
            rows_of = functools.partial(_rows_of, part=None if whole else part, width=w)
            parents = rows_of(tree_parents, True) if tree_parents is not None else None
            with whole_row_blocks(self.model, (r1 - r0) * w):
                out = kv.forward(self.model, rows_of(ids, True), rows_of(valid, True) if valid is not None else None,
                                 parents=parents, first_row=r0, **extra)  # fmt: skip
            assert kv.last_end is not None
            ends.append(kv.last_end)
            if self.features is not None:
                h = out.features
                if whole:  # (read by the proposer's settle before the next forward)
                    features = h
                else:
                    features = h.new_zeros(n, t, h.shape[-1]) if features is None else features
                    features[part, :w] = h
            args = (out.logits, rows_of(d.probs), rows_of(d.tokens))
            rest = (rows_of(cut), rows_of(s.temperature), rows_of(s.top_p))
            if verdict is not None:
                assert d.parents is not None
                result = self.tree_verifier(*args, rows_of(d.parents), *rest, rows_of(uniforms))
                verdict[part, 0], verdict[part, 1], verdict[part, 2:] = result.accepted, result.next_token, result.path
            else:
                result = self.verifier(*args, *rest, rows_of(uniforms, True))
                decided.append(torch.stack([result.accepted, result.next_token], 1))
        # the step's one copy back
        host = verdict.cpu() if verdict is not None else (decided[0] if whole else torch.cat(decided)).cpu()
        accepted, path = host[:, 0], host[:, 2:].bool() if trees else None
        for (r0, r1), end in zip(parts, ends):  # roll back: keep each row's accepted tokens
            w = max(cuts[r0:r1]) + 1
            if w == 1:  # only each row's last token, always kept: nothing to roll back
                continue
            if path is not None:
                keep = torch.cat([torch.ones(r1 - r0, 1, dtype=torch.bool), path[r0:r1, : w - 1]], 1)
            else:
                keep = torch.arange(w)[None, :] <= accepted[r0:r1, None]
            kv.keep_last(keep, first_row=r0, end=end)
        return Verdict(accepted, host[:, 1], path, features)

    def _greedy(self, kv: BatchKV, rows: list[Request], drafts: Drafts, t: int, extra: dict[str, Any]) -> Verdict:
        """`verify` where every row is greedy and verifies the same t - 1 draft tokens (plain
        decoding is t = 1; a batch drafting k is t = k + 1): the verdict `verify_chains`
        reaches, from the target's argmax alone, without the rule's per-row tensors, the split
        or, for plain decoding, a rollback (on a small model host time is most of a step's
        overhead). Each row is charged its t draws, as the general path's uniforms are."""
        n = len(rows)
        for r in rows:
            r.draws += t
        with whole_row_blocks(self.model, n * t):
            out = kv.forward(self.model, self._ids(rows, drafts, t), None, **extra)  # (every slot real)
        end = kv.last_end
        # (features: read by the proposer's settle before the next forward, as the general path's)
        features = out.features if self.features is not None else None
        best = out.logits.argmax(-1)  # [n, t]
        if t == 1:
            return Verdict(torch.zeros(n, dtype=torch.long), best[:, 0].cpu(), None, features)
        # the leading run of draft tokens equal to the target's argmax (verified ones are real: >= 0)
        accepted = (best[:, :-1] == drafts.tokens[:, : t - 1]).cumprod(1).sum(1)
        host = torch.stack([accepted, best.gather(1, accepted[:, None]).squeeze(1)], 1).cpu()
        kv.keep_last(torch.arange(t)[None, :] <= host[:, :1], end=end)
        return Verdict(host[:, 0], host[:, 1], None, features)

    def peek(self, rows: list[Request], drafts: Drafts, draft_len: torch.Tensor) -> torch.Tensor:
        """The processed target distributions at every draft position, [rows, K + 1, V] on the
        device; the cache is left as it was (`Engine.peek_target`)."""
        kv, t = self._kv(), drafts.tokens.shape[1] + 1
        ids = self._ids(rows, drafts, t)
        valid = torch.arange(t)[None, :] <= draft_len[:, None]
        parents = slot_parents(drafts.parents, t) if drafts.parents is not None else None
        with whole_row_blocks(self.model, len(rows) * t):
            out = kv.forward(self.model, ids, valid, parents=parents)
        kv.keep_last(torch.zeros(len(rows), t, dtype=torch.bool))
        s = RowSampling(rows, self.device)
        return process_logits(out.logits, s.temperature, s.top_p)
