"""Per-request acceptance traces: what drafting at each output position of a request yields,
recorded from the real engine and replayed by `ReplayEngine` (issue 32, item 3).

For request i and output position p (tokens generated before the draft), a trace holds what a
K-token draft from there meets:
- `ratio[p, j]`: the probability that draft token j is accepted given tokens 0..j-1 were,
  along the draft's own path: for greedy rows 1 where the target's argmax is the draft token
  and 0 where it is not (so a greedy replay is exact for any draft length up to K and any
  verified prefix: greedy output does not depend on how it was drafted); for sampled rows the
  rejection rule's min(1, p(d_j) / q(d_j));
- `signals[p, j]`: what the estimators read of the draft at that position (`SIGNALS`, the
  fields of `DraftSummary`: the draft's probability of its token, its entropy and margin, the
  companion's probability of the token and its overlap with the draft), so estimators and
  SV's cut run unchanged in replay.

`adactl.traces.record_traces` records them (each step drafts K tokens, reads the target's
verdict off the clock, and verifies none, so every output position is recorded once);
`python train/record_traces.py` makes the shipped files. A file is NumPy's `.npz`, read with
`allow_pickle=False`: the meta as JSON text (format, version, the models with the draft's
digest, workload, temperature, K), and the requests' arrays concatenated.
Not here: choosing which trace a replayed request follows (the replay, the benches).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "adactl-acceptance-traces"
VERSION = 1
SIGNALS = ("token_prob", "entropy", "margin", "companion_token_prob", "overlap")


class TraceError(ValueError):
    """A trace file that is corrupt, foreign to adactl, or recorded with another draft."""


@dataclass(frozen=True)
class RequestTrace:
    """One request's acceptance at every output position it generated."""

    prompt_len: int
    greedy: bool
    ratio: np.ndarray  # [P, K] float32 in [0, 1]
    signals: np.ndarray  # [P, K, len(SIGNALS)] float32
    group: str = ""  # the workload it came from ("sharegpt", "humaneval")
    eos: bool = False  # the request ended with EOS: its output is positions + 1 tokens long

    @property
    def positions(self) -> int:
        """Decode steps recorded: row r drafted after r + 1 generated tokens (the first came from prefill)."""
        return int(self.ratio.shape[0])

    @property
    def length(self) -> int | None:
        """Tokens the request generated when it ended by EOS (None: it ran to its length limit)."""
        return self.positions + 1 if self.eos else None

    def row(self, position: int) -> int:
        """The recorded row a draft after `position` generated tokens reads (past the end: from
        the start again)."""
        return max(position - 1, 0) % self.positions

    def accepted(self, position: int, cut: int, uniforms: Sequence[float]) -> int:
        """Tokens of a `cut`-token draft at `position` accepted, with common random numbers
        `uniforms` (one per draft position): token j is accepted if every token before it was
        and uniforms[j] < ratio[position, j]."""
        return kept(uniforms, self.ratio[self.row(position)], cut)


def kept(uniforms: Sequence[float], ratio: Sequence[float], cut: int) -> int:
    """Draft tokens accepted of `cut` verified: token j is if every token before it was and
    uniforms[j] < ratio[j] (the conditional acceptance of position j)."""
    a = 0
    while a < cut and uniforms[a] < ratio[a]:
        a += 1
    return a


@dataclass
class AcceptanceTraces:
    """The traces of one recording (a workload, a temperature) or a mix of several."""

    requests: list[RequestTrace]
    meta: dict[str, Any] = field(default_factory=dict)  # models (with the draft's digest), workload, temperature, K

    @property
    def max_draft(self) -> int:
        return min((int(t.ratio.shape[1]) for t in self.requests), default=0)

    def __len__(self) -> int:
        return len(self.requests)

    def mean_acceptance(self) -> list[float]:
        """Mean conditional acceptance by draft position over every request and position: the
        flat alpha a replay without traces would use."""
        ratios = np.concatenate([t.ratio[:, : self.max_draft] for t in self.requests])
        survival = np.cumprod(ratios, axis=1).mean(0)
        before = np.concatenate([[1.0], survival[:-1]])
        return [float(s / b) if b > 0 else 0.0 for s, b in zip(survival, before)]

    @staticmethod
    def mix(parts: Sequence[AcceptanceTraces]) -> AcceptanceTraces:
        """Several recordings' requests interleaved (a mixed chat + code workload), one request of each in turn."""
        if not parts:
            raise TraceError("mixing needs at least one trace set")
        drafts = {json.dumps(p.meta.get("models", {}), sort_keys=True) for p in parts}
        if len(drafts) > 1:
            raise TraceError(f"traces recorded with different models cannot be mixed: {sorted(drafts)}")
        longest = max(len(p) for p in parts)
        requests = [p.requests[i] for i in range(longest) for p in parts if i < len(p)]
        meta = {**parts[0].meta, "workload": "+".join(str(p.meta.get("workload", "?")) for p in parts),
                "temperature": sorted({p.meta.get("temperature") for p in parts}, key=str)}  # fmt: skip
        return AcceptanceTraces(requests, meta)

    # ------------------------------------------------------------------- file
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.requests:
            raise TraceError("no requests to save")
        k = self.max_draft
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "signals": list(SIGNALS), "max_draft": k,
                "groups": [t.group for t in self.requests]}  # fmt: skip
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            np.savez_compressed(
                f,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                prompt_len=np.array([t.prompt_len for t in self.requests], dtype=np.int32),
                greedy=np.array([t.greedy for t in self.requests], dtype=np.bool_),
                eos=np.array([t.eos for t in self.requests], dtype=np.bool_),
                positions=np.array([t.positions for t in self.requests], dtype=np.int32),
                ratio=np.concatenate([t.ratio[:, :k] for t in self.requests]).astype(np.float16),
                signals=np.concatenate([t.signals[:, :k] for t in self.requests]).astype(np.float16),
            )
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, draft: str | None = None) -> AcceptanceTraces:
        """Read and check a trace file; `draft`: the draft spec with digest the replay stands in
        for (`ModelPair.model_ids["draft"]`), refused if the traces were recorded with another.
        `TraceError` says what is wrong and what to do."""
        path = Path(path)
        remake = "record them again with `python train/record_traces.py`"
        if not path.is_file():
            raise TraceError(f"acceptance traces {path} do not exist; {remake}")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {n: data[n] for n in ("prompt_len", "greedy", "eos", "positions", "ratio", "signals")}
        except (OSError, ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceError(
                f"acceptance traces {path} are corrupt or not an adactl trace file ({e}); {remake}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TraceError(f'{path} is not an adactl trace file (no "format": "{FORMAT}"); {remake}')
        if meta.get("version") != VERSION:
            raise TraceError(
                f"{path} is a version {meta.get('version')} trace file; this adactl reads {VERSION}; {remake}"
            )
        recorded = meta.get("models", {}).get("draft")
        if draft is not None and recorded != draft:
            raise TraceError(f"{path} was recorded with draft {recorded!r}, not {draft!r} (another digest: another "
                             f"draft's acceptance); {remake} for this draft")  # fmt: skip
        return cls(cls._split(path, meta, arrays, remake), meta)

    @staticmethod
    def _split(path: Path, meta: dict[str, Any], a: dict[str, np.ndarray], remake: str) -> list[RequestTrace]:
        n, k = len(a["prompt_len"]), int(meta.get("max_draft", 0))
        positions = a["positions"].astype(np.int64)
        groups = meta.get("groups", [""] * n)
        ok = (
            len(a["greedy"]) == n == len(a["eos"]) == len(positions) == len(groups)
            and k >= 1 and (positions >= 1).all()
            and a["ratio"].shape == (int(positions.sum()), k)
            and a["signals"].shape == (int(positions.sum()), k, len(SIGNALS))
            and (a["prompt_len"] >= 1).all()
        )  # fmt: skip
        if not ok:
            raise TraceError(f"{path}: the arrays' shapes do not match its {n} requests; {remake}")
        ratio, signals = a["ratio"].astype(np.float32), a["signals"].astype(np.float32)
        if not (np.isfinite(ratio).all() and (ratio >= 0).all() and (ratio <= 1).all() and np.isfinite(signals).all()):
            raise TraceError(f"{path}: acceptance ratios outside [0, 1] or non-finite signals; {remake}")
        ends = np.cumsum(positions)
        starts = ends - positions
        return [RequestTrace(int(a["prompt_len"][i]), bool(a["greedy"][i]), ratio[s:e], signals[s:e], str(groups[i]),
                             bool(a["eos"][i])) for i, (s, e) in enumerate(zip(starts, ends))]  # fmt: skip


MIXED = ("sharegpt", "humaneval")  # the mixed workload: chat and code requests in turn


def shipped_traces(workload: str, draft: Any = None) -> AcceptanceTraces:
    """The shipped traces of `workload` (sharegpt, humaneval, or mixed: both, a chat and a code
    request in turn), greedy and at 0.7, interleaved; `draft`: checked as `load` does."""
    kinds = MIXED if workload == "mixed" else (workload,)
    return AcceptanceTraces.mix([AcceptanceTraces.load(shipped_traces_path(w, t), draft=draft)
                                 for t in (0.0, 0.7) for w in kinds])  # fmt: skip


def shipped_traces_path(workload: str, temperature: float) -> Path:
    """Where the traces of the default pair on `workload` at `temperature` are shipped."""
    from .models import SHIPPED_MODELS

    t = "greedy" if temperature <= 0 else f"t{temperature:g}".replace(".", "")
    return SHIPPED_MODELS / "traces" / f"{workload}_{t}.npz"
