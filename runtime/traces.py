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

A *tree trace* (`parents` set) holds, per position, every node a width-W, depth-D token tree
proposes (`adactl.runtime.tree`: W + (D - 1) W^2 nodes), in the engine's best-first order:
`parents[p, j]` is node j's parent (-1: the row's last token; -2: no node there, a growth that
proposed fewer), `ratio[p, j]` the chance node j is accepted when its parent was and its
earlier siblings were not (Sequoia's rule, as `verify_trees` applies it: greedy rows 1 for the
target's argmax; sampled rows min(1, p'(x) / q'(x)) against the residuals the earlier
siblings left), `signals[p, j]` node j's. Growth goes level by level and keeps the best nodes
in one order, so the tree any spec of the same width drafts, (d, W, n) with d <= D, is exactly
the first n recorded nodes of depth < d (`tree_nodes`), and the walk over its verified nodes
(`tree_accepted`) replays verification exactly for greedy rows and in distribution for
sampled ones. A request's chain trace carries its tree trace as `tree` (recorded in a second
pass over the same requests, `<workload>_<temperature>_trees.npz` for width 2 and
`..._trees_w4.npz` for width 4: a narrower tree is not a part of a wider growth, whose
frontier at a level is the best W of more candidates, so each width is its own recording).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import node_levels

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
    parents: np.ndarray | None = None  # [P, N] int: a tree trace's node parents (module docstring)
    tree: RequestTrace | None = None  # this request's tree trace, if one was recorded
    tree_width: int = 0  # a tree trace's W
    tree_depth: int = 0  # a tree trace's D
    _levels: np.ndarray | None = field(default=None, repr=False, compare=False)  # node depths, once asked

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

    def tree_draft(self, position: int, depth: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """The tree a (depth, W, nodes) spec drafts at `position` (a tree trace): the recorded
        node ids kept, best first, and their parents as indices into that list (-1: the root)."""
        assert self.parents is not None
        levels = self._levels
        if levels is None:  # every position's node depths, once (the replay asks every step)
            levels = node_levels(self.parents)
            object.__setattr__(self, "_levels", levels)
        row = self.row(position)
        return tree_nodes(self.parents[row], depth, nodes, levels[row])

    def tree_accepted(self, position: int, kept_ids: np.ndarray, parents: np.ndarray, verified: int,
                      uniforms: Sequence[float]) -> list[int]:  # fmt: skip
        """The accepted path (indices into `kept_ids`) when the first `verified` kept nodes are
        verified, with common random numbers `uniforms` (one per recorded node)."""
        ratio = self.ratio[self.row(position)]
        return tree_accepted(parents.tolist(), ratio[kept_ids].tolist(), [uniforms[j] for j in kept_ids], verified)


def tree_nodes(parents: np.ndarray, depth: int, nodes: int,
               levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Of a recorded growth's nodes (`parents` [N], best first, -2 for none; `levels`: their
    depths, if known), the ones a spec of `depth` levels keeping `nodes` drafts: the first
    `nodes` of depth < `depth`; returned as their recorded ids and their parents re-indexed
    into the kept list (-1: the root)."""
    level = node_levels(parents) if levels is None else levels
    ids = np.flatnonzero((level >= 0) & (level < depth))[:nodes]
    where = np.full(len(parents) + 1, -1, dtype=np.int64)  # recorded id + 1 -> kept index (slot 0: the root)
    where[ids + 1] = np.arange(len(ids))
    return ids, where[parents[ids] + 1]


def tree_accepted(parents: Sequence[int], ratio: Sequence[float], uniforms: Sequence[float],
                  verified: int) -> list[int]:  # fmt: skip
    """The walk `verify_trees` makes, on recorded outcomes: from the root, a node's children are
    tested in order (node j passes if uniforms[j] < ratio[j], its sibling-conditional
    acceptance); the first to pass is descended into if it is verified (j < `verified`), and
    the walk ends there otherwise, or when none passes. Returns the accepted path."""
    path: list[int] = []
    node = -1
    for j, p in enumerate(parents):  # one pass: a node's children come after it, in order
        if p == node and uniforms[j] < ratio[j]:
            if j >= verified:
                break
            path.append(j)
            node = j
    return path


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
        """Draft tokens recorded per position (a tree trace: its depth)."""
        if self.tree is not None:
            return int(self.tree["depth"])
        return min((int(t.ratio.shape[1]) for t in self.requests), default=0)

    @property
    def tree(self) -> dict[str, int] | None:
        """A tree trace's growth, {"depth": D, "width": W} (None: chains)."""
        tree = self.meta.get("tree")
        return {"depth": int(tree["depth"]), "width": int(tree["width"])} if tree else None

    @property
    def tree_width(self) -> int | None:
        """The width of the tree traces every request carries (None: not every request carries one)."""
        trees = [t.tree for t in self.requests]
        widths = {t.tree_width for t in trees if t is not None}
        return widths.pop() if trees and None not in trees and len(widths) == 1 else None

    def with_trees(self, trees: AcceptanceTraces) -> AcceptanceTraces:
        """These chain traces with `trees` (a tree recording of the same requests, in the same
        order) attached request by request: the replay drafts a request's trees from its own.
        Greedy recordings of a request are the same output; sampled ones are not (the engine's
        random stream advances with what it drafts, so the two passes sample different
        continuations and may end at other lengths): a request keeps its chain recording's
        length and EOS, and reads its tree rows as chain rows are read, from the start again past
        the recording's end."""
        if trees.tree is None:
            raise TraceError("with_trees takes a tree trace (recorded with --tree-width)")
        same = len(trees) == len(self) and all(
            a.prompt_len == b.prompt_len and a.greedy == b.greedy for a, b in zip(self.requests, trees.requests)
        )
        if not same or trees.meta.get("models") != self.meta.get("models"):
            raise TraceError(f"the tree traces ({trees.meta.get('workload')}, {len(trees)} requests) were not "
                             f"recorded on these requests ({self.meta.get('workload')}, {len(self)}) with these "
                             "models")  # fmt: skip
        requests = [replace(a, tree=b) for a, b in zip(self.requests, trees.requests)]
        return AcceptanceTraces(requests, {**self.meta, "trees": trees.tree})

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
        if len({p.tree is None for p in parts}) > 1:
            raise TraceError("chain traces and tree traces cannot be mixed (attach trees with with_trees)")
        longest = max(len(p) for p in parts)
        requests = [p.requests[i] for i in range(longest) for p in parts if i < len(p)]
        meta = {**parts[0].meta, "workload": "+".join(str(p.meta.get("workload", "?")) for p in parts),
                "temperature": sorted({p.meta.get("temperature") for p in parts}, key=str)}  # fmt: skip
        return AcceptanceTraces(requests, meta)

    # ------------------------------------------------------------------- file
    def save(self, path: str | Path) -> Path:
        """Write these traces (chains, or a tree trace); attached tree traces are not written:
        they have their own file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.requests:
            raise TraceError("no requests to save")
        k = self.requests[0].ratio.shape[1] if self.tree is not None else self.max_draft  # a tree: every node
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "signals": list(SIGNALS), "max_draft": k,
                "groups": [t.group for t in self.requests]}  # fmt: skip
        tree_arrays: dict[str, Any] = {}
        if self.tree is not None:
            tree_arrays["parents"] = np.concatenate([t.parents for t in self.requests]).astype(np.int16)
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
                **tree_arrays,
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
                if meta.get("tree"):
                    arrays["parents"] = data["parents"]
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
        parents = a.get("parents")
        if parents is not None:
            parents = parents.astype(np.int64)
            before = parents < np.arange(k)[None, :]  # parents come before children
            if parents.shape != ratio.shape or not (before & (parents >= -2)).all():
                raise TraceError(f"{path}: its tree's parents are not a best-first node order; {remake}")
        width, depth = (int(meta["tree"]["width"]), int(meta["tree"]["depth"])) if parents is not None else (0, 0)
        ends = np.cumsum(positions)
        starts = ends - positions
        return [RequestTrace(int(a["prompt_len"][i]), bool(a["greedy"][i]), ratio[s:e], signals[s:e], str(groups[i]),
                             bool(a["eos"][i]), parents[s:e] if parents is not None else None,
                             tree_width=width, tree_depth=depth)
                for i, (s, e) in enumerate(zip(starts, ends))]  # fmt: skip


MIXED = ("sharegpt", "humaneval")  # the mixed workload: chat and code requests in turn


def shipped_traces(workload: str, draft: Any = None, trees: bool = True, tree_width: int = 2) -> AcceptanceTraces:
    """The shipped traces of `workload` (sharegpt, humaneval, or mixed: both, a chat and a code
    request in turn), greedy and at 0.7, interleaved, with their tree traces of `tree_width`
    attached where they are shipped (`trees`; widths 2 and 4 are); `draft`: checked as `load`
    does."""
    kinds = MIXED if workload == "mixed" else (workload,)
    parts = []
    for t in (0.0, 0.7):
        for w in kinds:
            chains = AcceptanceTraces.load(shipped_traces_path(w, t), draft=draft)
            tree_file = shipped_traces_path(w, t, trees=True, tree_width=tree_width)
            if trees and tree_file.is_file():
                chains = chains.with_trees(AcceptanceTraces.load(tree_file, draft=draft))
            parts.append(chains)
    return AcceptanceTraces.mix(parts)


def shipped_traces_path(workload: str, temperature: float, trees: bool = False, tree_width: int = 2) -> Path:
    """Where the traces of the default pair on `workload` at `temperature` are shipped (`trees`:
    its tree traces of `tree_width`, `_trees` for width 2, `_trees_wW` for another)."""
    from .models import SHIPPED_MODELS

    t = "greedy" if temperature <= 0 else f"t{temperature:g}".replace(".", "")
    kind = ("_trees" if tree_width == 2 else f"_trees_w{tree_width}") if trees else ""
    return SHIPPED_MODELS / "traces" / f"{workload}_{t}{kind}.npz"
