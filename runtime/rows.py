"""The engine's rows: each request's state, the order of the decode batch, and its KV caches.

- `Request` is one request's state inside the engine (prompt, output, what each cache still
  has to see, its random draws).
- `Rows` keeps the running requests in cache row order, the prompts being prefilled in their
  own caches, and moves rows between them. The decode batch is laid out as consecutive
  segments, [drafting rows, longest draft first | running rows that do not draft | deferred
  rows], so every forward runs on a prefix of the rows and rows that do not take part cost
  nothing; `arrange` moves only the rows that change segment (each move copies its cache).
- `RowSampling` is the sampling parameters of a run of rows, and their uniforms: a row's
  draws are numbered from its own seed (`verify.counter_uniforms`), so a request samples the
  same tokens whatever else is in the batch.

Not here: what runs (the plan), models, sampling rules.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .graphs import CudaGraphs, StaticShapes
from .kv import BatchKV, HostRow, KVConfig
from .shapes import arrangement, dropping, moved_rows
from .stream import Playback, Stream, count_units
from .types import SLO, RequestError, RequestResult, RequestView, SamplingParams
from .verify import counter_uniforms, process_logits, sample


@dataclass
class Request:
    """Engine-internal state of one request."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival_time: float
    seed: int  # of the request's draws: its own seed, or one drawn from the engine's
    draws: int = 0  # uniforms used so far (the next draw's number)
    output: list[int] = field(default_factory=list)
    prefilled: int = 0
    first_token_time: float | None = None
    target_pending: list[int] = field(default_factory=list)  # emitted, not yet in the target cache
    draft_pending: list[int] = field(default_factory=list)  # emitted, not yet in the draft cache
    # feature drafts only: the target features of the positions before the draft_pending
    # tokens, in chunks [L, H] (a step's chunk is a view of that step's features: no copy per
    # token), and the target feature of the last prompt token prefilled so far
    draft_features: list[torch.Tensor] = field(default_factory=list)
    last_feature: torch.Tensor | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    slo: SLO | None = None
    playback: Playback | None = None  # the consumer's account, for streamed requests
    # what a prefill computes: the prompt, or after a recompute preemption, the prompt and the
    # output so far (the last logits then give its next token)
    to_prefill: list[int] = field(default_factory=list)
    admitted: int = -1  # when it last joined the batch (admission order, for preemption victims)
    host: tuple[HostRow, HostRow | None] | None = None  # its target (and draft) KV, offloaded
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.to_prefill = self.to_prefill or self.prompt

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.output)

    def view(self, now: float, running: bool, kv_blocks: int | None = None) -> RequestView:
        """What controllers see of this request (`running`: it is in the batch)."""
        if running:
            status, kv = "running", "device"
        elif self.host is not None:
            status, kv = "offloaded", "host"
        else:
            status, kv = ("prefilling", "device") if self.prefilled else ("waiting", "none")
        stream = self.playback.stream if self.playback is not None else None
        progress = self.playback.progress(now) if self.playback is not None else None
        prompt_len = len(self.prompt) if running else len(self.to_prefill)  # preempted: the whole context again
        prefilled = self.prefilled
        if self.host is not None:  # offloaded: its whole context is computed (as the replay says)
            prompt_len = prefilled = self.context_len
        return RequestView(self.request_id, status, prompt_len, prefilled, len(self.output), self.context_len,
                           self.arrival_time, self.first_token_time, self.sampling, self.slo, stream, progress, kv,
                           None, kv_blocks, max(len(self.draft_pending), 1))  # fmt: skip

    def recompute(self) -> None:
        """Its KV is dropped: a prefill of its whole context brings it back. (The token that
        prefill samples draws from the request's own counter, as a decode step would; a sampled
        request's later draws follow its own history, preemptions included, so its tokens
        depend on when it was preempted, not on what else is in the batch.)"""
        self.to_prefill = self.prompt + self.output
        self.prefilled = 0
        self.target_pending, self.draft_pending, self.draft_features, self.last_feature = [], [], [], None

    def append(self, tokens: list[int], eos_ids: set[int], max_context: int, tokenizer: Any) -> list[int]:
        """Append tokens up to a stop condition (sets `finish_reason`); returns those kept."""
        kept = []
        for tok in tokens:
            self.output.append(tok)
            kept.append(tok)
            if self.sampling.stop_on_eos and tok in eos_ids:
                self.finish_reason = "eos"
            elif len(self.output) >= self.sampling.max_new_tokens:
                self.finish_reason = "length"
            elif self.context_len >= max_context:
                self.finish_reason = "context"
            if self.finish_reason is not None:
                break
        if self.playback is not None and kept:
            self._produce(time.perf_counter(), tokenizer)
        return kept

    def result(self, reason: str, now: float, tokenizer: Any) -> RequestResult:
        """Finish with `reason`: the request's result (a streamed one's account settled)."""
        self.finish_reason = reason
        units = misses = read_end = None
        if self.playback is not None:
            self._produce(now, tokenizer, finished=True)
            units, misses = self.playback.settle()
            read_end = self.playback.read_end
        return RequestResult(self.request_id, self.prompt, self.output, reason, self.arrival_time,
                             self.first_token_time, now, units, misses, read_end)  # fmt: skip

    def _produce(self, now: float, tokenizer: Any, finished: bool = False) -> None:
        """Tell a streamed request's consumer how many complete units the output holds."""
        assert self.playback is not None
        unit = self.playback.stream.unit
        text = "" if unit == "token" else tokenizer.decode(self.output, skip_special_tokens=True)
        self.playback.produce(count_units(unit, len(self.output), text, finished), len(self.output), now, finished)


def check_service(slo: SLO | None, stream: Stream | None, has_tokenizer: bool) -> None:
    """Raise `RequestError` if a request's SLO or stream is not one (or is invalid)."""
    for value, kind in ((slo, SLO), (stream, Stream)):
        if value is not None and not isinstance(value, kind):
            raise RequestError(f"{kind.__name__.lower()} must be an adactl.runtime.{kind.__name__}, "
                               f"got {type(value).__name__}")  # fmt: skip
        if value is not None:
            value.validate()
    if stream is not None and stream.unit != "token" and not has_tokenizer:
        raise RequestError(f"a stream read in {stream.unit}s needs a tokenizer, but this engine has none")


class RowSampling:
    """Sampling parameters of a run of rows (on the CPU, where rules read them without a
    device sync) and their uniforms (on the device)."""

    def __init__(self, rows: Sequence[Request], device: torch.device) -> None:
        self.rows = list(rows)
        self.device = device
        # read from the requests, not the tensors: a step's many small decisions cost no ops
        self.all_greedy = all(r.sampling.temperature <= 0 for r in self.rows)
        self.plain = all(r.sampling.temperature in (0, 1) and r.sampling.top_p >= 1 for r in self.rows)

    # the per-row tensors, built on first use (a greedy chain's draft never reads them)
    @functools.cached_property
    def temperature(self) -> torch.Tensor:
        return torch.tensor([r.sampling.temperature for r in self.rows], dtype=torch.float32)

    @functools.cached_property
    def top_p(self) -> torch.Tensor:
        return torch.tensor([r.sampling.top_p for r in self.rows], dtype=torch.float32)

    @functools.cached_property
    def greedy(self) -> torch.Tensor:
        return self.temperature <= 0

    def head(self, m: int) -> RowSampling:
        """The first m rows."""
        return self if m == len(self.rows) else RowSampling(self.rows[:m], self.device)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """`process_logits` for these rows (logits [rows, ..., V]); a plain softmax where no
        row has a temperature but 0 or 1 or a top-p (no per-row tensors then)."""
        if self.plain:
            return torch.softmax(logits.float(), dim=-1)
        return process_logits(logits, self.temperature, self.top_p)

    def sample(self, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """`sample` for these rows (probs [rows, V]); the argmax where every row is greedy."""
        if self.all_greedy:
            return probs.argmax(-1)
        return sample(probs, self.greedy, uniforms)

    def uniforms(self, counts: Sequence[int], width: int) -> torch.Tensor:
        """[rows, width] uniforms on the device; row i uses (and is charged) its first
        counts[i], so its next call continues its own stream. Greedy rows get zeros (they
        read none), computed for the sampled rows only."""
        where = [i for i, r in enumerate(self.rows) if r.sampling.temperature > 0]  # greedy rows read none
        drawn = None
        if where:
            seeds = torch.tensor([self.rows[i].seed for i in where], dtype=torch.long)
            offsets = torch.tensor([self.rows[i].draws for i in where], dtype=torch.long)
            drawn = counter_uniforms(seeds.to(self.device), offsets.to(self.device), width)
        for r, n in zip(self.rows, counts):
            r.draws += int(n)
        if len(where) == len(self.rows) and drawn is not None:
            return drawn
        out = torch.zeros(len(self.rows), width, device=self.device)
        if drawn is not None:
            out[torch.tensor(where).to(self.device)] = drawn
        return out


class Rows:
    """Running requests in cache row order, prompts being prefilled in caches of their own,
    and the KV caches of the target (and the draft) for both.

    A finished prompt's row moves to the batch caches; when nothing runs and every prefill row
    is done, the prefill caches are adopted whole."""

    def __init__(
        self,
        target_layers: int,
        draft_layers: int | None,
        device: torch.device,
        config: KVConfig,
        static: StaticShapes | None = None,
        graphs: CudaGraphs | None = None,
    ):
        self.device, self.config, self.static, self.graphs = device, config, static, graphs
        self.target_layers, self.draft_layers = target_layers, draft_layers
        self.moved = 0  # KV columns copied moving decode rows (`permute`), since the engine began
        self._start()

    def caches(self) -> list[BatchKV]:
        """Every cache held (batch and prefill, target and draft)."""
        return [kv for kv in (self.target, self.prefill_target, self.draft, self.prefill_draft) if kv is not None]

    def close(self) -> None:
        """Free every cache's buffers, graphs and reservation (the rows are gone)."""
        for kv in self.caches():
            kv.close()

    def reserve(self, rows: int, cols: int) -> None:
        """The batch caches' capacity (target and draft) for `rows` rows of `cols` columns,
        now and over every `reset` (`BatchKV.reserve`; `close` gives it up)."""
        for kv in (self.target, self.draft):
            if kv is not None:
                kv.reserve(rows, cols)

    def reset(self) -> None:
        """No rows, the caches emptied (`BatchKV.clear`): those that hold graphs or a
        reservation keep their buffers and graphs, so the steps after an abort replay instead
        of capturing again and memory stays where it was; the others are freed."""
        for kv in self.caches():
            kv.clear()
        self.running.clear()
        self.prefilling.clear()

    def _start(self) -> None:
        self.target = self._new(self.target_layers)
        self.prefill_target = self._new(self.target_layers)
        self.draft = self._new(self.draft_layers) if self.draft_layers is not None else None
        self.prefill_draft = self._new(self.draft_layers) if self.draft_layers is not None else None
        self.running: list[Request] = []
        self.prefilling: list[Request] = []

    def _new(self, layers: int) -> BatchKV:
        return BatchKV(layers, self.device, self.config, self.static, self.graphs)

    def nbytes(self, include_draft: bool = True) -> int:
        total = self.target.nbytes() + self.prefill_target.nbytes()
        if include_draft and self.draft is not None and self.prefill_draft is not None:
            total += self.draft.nbytes() + self.prefill_draft.nbytes()
        return total

    # ------------------------------------------------------------ decode rows
    def arrange(self, groups: list[list[Request]]) -> None:
        """Lay the rows out as consecutive segments, `groups` in order (order within a segment
        is free), moving as few rows as possible: a row already inside its segment stays put.
        Each moved row copies its KV cache, so a deferral or a new draft length costs the rows
        that change segment, not the batch."""
        group = {id(r): g for g, members in enumerate(groups) for r in members}
        perm = arrangement([group[id(r)] for r in self.running], [len(members) for members in groups])
        if perm != list(range(len(perm))):
            self.permute(perm)

    def drop(self, drop: set[int]) -> None:
        """Remove rows `drop`; rows from the end move into their places (the others stay)."""
        if drop:
            self.permute(dropping(len(self.running), drop))
        else:
            self.target.maybe_compact()
            if self.draft is not None:
                self.draft.maybe_compact()

    def permute(self, perm: list[int]) -> None:
        self.moved += moved_rows(perm) * self.target.n_cols  # (the copies it makes)
        self.target.permute(perm)
        if self.draft is not None:
            self.draft.permute(perm)
        self.running = [self.running[i] for i in perm]

    def remove(self, req: Request) -> None:
        """Drop a running request's row (its KV is gone)."""
        self.drop({self.running.index(req)})

    def to_host(self, req: Request) -> tuple[HostRow, HostRow | None]:
        """Copy a running request's KV (target and draft) to host memory and drop its row."""
        i = self.running.index(req)
        host = (self.target.row_to_host(i), self.draft.row_to_host(i) if self.draft is not None else None)
        self.drop({i})
        return host

    def from_host(self, req: Request, host: tuple[HostRow, HostRow | None]) -> None:
        """Bring a request's KV back from host memory as the last running row."""
        self.target.add_host_row(host[0])
        if self.draft is not None and host[1] is not None:
            self.draft.add_host_row(host[1])
        self.running.append(req)

    # ----------------------------------------------------------- prefill rows
    def start_prefill(self, new: list[Request]) -> None:
        """Give each new prompt an empty row in the prefill caches."""
        if not new:
            return
        for kv in (self.prefill_target, self.prefill_draft):
            if kv is not None:
                kv.reserve_rows(kv.n_rows + len(new))
                kv.new_rows(len(new))
        self.prefilling += new

    def join(self, joining: list[Request]) -> None:
        """Move requests whose prompt is done from the prefill caches to the batch caches."""
        if not joining:
            return
        rows = [self.prefilling.index(r) for r in joining]
        if (
            not self.running
            and len(joining) == len(self.prefilling)
            and self.graphs is None
            and self.target.reserved == (0, 0)
        ):
            # nothing is running and every prefill row is done: adopt the prefill caches, and
            # the empty batch caches prefill next. (Not with graphs or a reservation: the batch
            # caches keep their identity, so their decode graphs are captured once and their
            # reserved capacity stays theirs; the rows are copied.)
            self.permute_prefill(rows)
            self.target, self.prefill_target = self.prefill_target, self.target
            if self.draft is not None and self.prefill_draft is not None:
                self.draft, self.prefill_draft = self.prefill_draft, self.draft
            self.running, self.prefilling = self.prefilling, []
            return
        for main, prefill in ((self.target, self.prefill_target), (self.draft, self.prefill_draft)):
            if main is not None and prefill is not None:
                main.reserve_rows(main.n_rows + len(rows))
                for r in rows:
                    main.add_row(prefill, r)
        self.running += joining
        self.drop_prefill(set(rows))

    def drop_prefill(self, drop: set[int]) -> None:
        self.permute_prefill([i for i in range(len(self.prefilling)) if i not in drop])

    def permute_prefill(self, perm: list[int]) -> None:
        if perm == list(range(len(self.prefilling))):
            return
        self.prefill_target.permute(perm)
        if self.prefill_draft is not None:
            self.prefill_draft.permute(perm)
        self.prefilling = [self.prefilling[i] for i in perm]


def slot_parents(parents: torch.Tensor, t: int) -> torch.Tensor:
    """[B, t] parents of the verify forward's slots: slot 0 (the last token) hangs off the
    context, node j sits in slot j + 1 under its parent's slot (0 for a child of the last token)."""
    slots = torch.full((parents.shape[0], t), -1, dtype=torch.long)
    if t > 1:
        p = parents[:, : t - 1]
        slots[:, 1:] = torch.where(p >= 0, p + 1, 0)
    return slots
