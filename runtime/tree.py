"""Growing one request's draft token tree (EAGLE-2's dynamic expansion), as plain bookkeeping.

The engine runs the draft model; this module decides what to expand and what to keep:
- level by level, the `width` nodes of the newest level with the highest *path value* are
  expanded: each proposes `width` children, the most likely ones (greedy rows) or drawn from
  the draft distribution without replacement (sampled rows, in draw order);
- at the end the `nodes` best of everything proposed are kept, sorted best first, parents
  before children and siblings in draw order, so that any prefix of the order is a tree
  (what `DraftBatch.parents` promises and `verify_trees` relies on).

Path value of a node = product of the draft's probabilities along its path (the chance the
draft's own distribution would produce the path), as in EAGLE-2. For *sampled* rows the
shape must not depend on the drawn tokens, or pruning would favour some tokens over others
and the output would no longer follow the target; their path value uses a fixed prior per
sibling rank (`SAMPLED_RANK_PRIOR`) instead, so a sampled row's shape is set by its spec alone.

Nothing here touches models or caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .types import TreeSpec
from .verify import sample

SAMPLED_RANK_PRIOR = (0.55, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.015)
"""Path-value factor of a sampled row's i-th drawn child (roughly how often the i-th of
several drafted alternatives is the accepted one); later ranks reuse the last entry."""


@dataclass
class Node:
    token: int  # target token id
    parent: int  # index in the row's node list, -1 = a child of the row's last token
    value: float  # path value (see the module docstring)
    depth: int  # 0 = a child of the row's last token
    dist: int  # which of the row's distributions it was drawn from (0 = after the last token)
    col: int = -1  # draft-cache column once fed to the draft model (expanded nodes only)
    own_dist: int = -1  # the distribution after it, once expanded


@dataclass
class RowTree:
    """One request's tree while it grows."""

    spec: TreeSpec
    greedy: bool
    nodes: list[Node] = field(default_factory=list)
    dists: list[torch.Tensor] = field(default_factory=list)  # [N'] processed draft distributions

    def propose(self, parent: int, q: torch.Tensor, uniforms: torch.Tensor) -> None:
        """Add `width` children of `parent` (-1: the root) drawn from distribution `q` [N'] (ids
        in the draft's vocabulary; the caller maps them). uniforms: [width] for sampled rows."""
        self.dists.append(q)
        d = len(self.dists) - 1
        if parent >= 0:
            self.nodes[parent].own_dist = d
        base = self.nodes[parent].value if parent >= 0 else 1.0
        depth = self.nodes[parent].depth + 1 if parent >= 0 else 0
        width = min(self.spec.width, int((q > 0).sum()))
        if self.greedy:
            top = q.topk(width)
            for p, t in zip(top.values.tolist(), top.indices.tolist()):
                self.nodes.append(Node(int(t), parent, base * p, depth, d))
            return
        left = q.clone()
        for i in range(width):
            t = int(sample(left[None], torch.zeros(1, dtype=torch.bool), uniforms[i : i + 1])[0])
            prior = SAMPLED_RANK_PRIOR[min(i, len(SAMPLED_RANK_PRIOR) - 1)]
            self.nodes.append(Node(t, parent, base * prior, depth, d))
            left[t] = 0.0

    def frontier(self, depth: int) -> list[int]:
        """The nodes at `depth` to expand next: the `width` of highest path value."""
        level = [i for i, n in enumerate(self.nodes) if n.depth == depth]
        level.sort(key=lambda i: (-self.nodes[i].value, i))
        return level[: self.spec.width]

    def best(self) -> list[int]:
        """The kept nodes, best first (value, then depth, then creation: parents before
        children, siblings in draw order), at most `spec.nodes`; the list is closed under
        taking parents (a child's value never exceeds its parent's)."""
        order = sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].value, self.nodes[i].depth, i))
        return order[: self.spec.nodes]


def chain_spec(k: int) -> TreeSpec:
    """A chain of k draft tokens as a tree spec."""
    return TreeSpec(depth=k, width=1 if k else 0, nodes=k)
