"""What acceptance predictors read from a step's drafts, and the labels its outcome gives.

Labels (DESIGN.md section 4): draft position j (from 0) of row i is *observed* when the target
verified it and every position before it was accepted: j < verified_i and j <= accepted_i.
Its label is 1 if accepted (j < accepted_i), else 0. So the label is the conditional
acceptance alpha_j the predictors estimate: for greedy rows argmax agreement, for sampled
rows the rejection rule's outcome (the engine reports whichever applies). Positions past
the verified prefix are censored, not negative.
"""

from __future__ import annotations

import torch

from adactl.interface import StepRecord
from adactl.runtime.types import DraftBatch

DRAFT_FEATURES = ("own_prob", "log_own_prob", "entropy", "margin", "position", "recent")
COMPANION_FEATURES = (
    "S", "A", "log_A", "log_own_prob", "log_companion_prob", "entropy", "margin", "position", "recent"
)  # fmt: skip
EPS = 1e-6


def drafted_mask(drafts: DraftBatch) -> torch.Tensor:
    """[B, K] bool: positions each row actually drafted."""
    k = drafts.tokens.shape[1]
    return torch.arange(k)[None, :] < drafts.draft_len[:, None]


def own_prob(drafts: DraftBatch) -> torch.Tensor:
    """[B, K] the draft's probability of its own token (0 where nothing was drafted)."""
    return drafts.summarized().token_prob


def draft_features(drafts: DraftBatch, recent: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K, F] features per draft position, named by `DRAFT_FEATURES`.

    recent: [B] each request's recent acceptance rate (0.5 when unknown)."""
    b, k = drafts.tokens.shape
    summary = drafts.summarized()
    q, entropy, margin = summary.token_prob, summary.entropy, summary.margin
    position = drafts.depth().float()  # a tree node's depth
    rec = (recent if recent is not None else torch.full((b,), 0.5))[:, None].expand(b, k)
    return torch.stack([q, torch.log(q + EPS), entropy, margin, position, rec.float()], dim=-1)


def companion_features(drafts: DraftBatch, recent: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K, F] Speculative Verification's features per position, named by `COMPANION_FEATURES`:
    S = sum_v min(p_draft(v), p_companion(v)) and A = min(1, p_companion(t) / p_draft(t)) for
    the drafted token t, plus the log-probabilities, the draft's entropy and top-2 margin (what
    the draft alone says of its confidence), position and recent acceptance."""
    summary = drafts.summarized()
    if summary.companion_token_prob is None or summary.overlap is None:
        raise ValueError("these drafts carry no companion distributions: load the draft with companion=...")
    b, k = drafts.tokens.shape
    q, c, s = summary.token_prob, summary.companion_token_prob, summary.overlap
    a = torch.clamp(c / (q + EPS), max=1.0)
    position = drafts.depth().float()
    rec = (recent if recent is not None else torch.full((b,), 0.5))[:, None].expand(b, k)
    feats = [s, a, torch.log(a + EPS), torch.log(q + EPS), torch.log(c + EPS), summary.entropy, summary.margin,
             position, rec.float()]  # fmt: skip
    return torch.stack(feats, dim=-1) * drafted_mask(drafts)[..., None]


def acceptance_labels(record: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed [B, K] bool, accepted [B, K] float32) for the step's draft positions. For a
    tree, node j is observed when verified with its parent on the accepted path (or a root
    child), and accepted when it is on the path."""
    k = record.drafts.tokens.shape[1]
    parents, path = record.drafts.parents, record.outcome.path
    if parents is not None and path is not None:
        verified = torch.arange(k)[None, :] < record.verify_len.long().cpu()[:, None]
        rows = torch.arange(parents.shape[0])[:, None]
        parent_on_path = path[rows, parents.clamp(min=0)] | (parents < 0)
        return verified & parent_on_path, path.float()
    j = torch.arange(k)[None, :]
    verified = record.verify_len.long().cpu()[:, None]
    accepted = record.outcome.accepted.long().cpu()[:, None]
    observed = (j < verified) & (j <= accepted)
    return observed, (j < accepted).float()


def level_labels(record: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed [B, D], accepted [B, D]) per tree *level*: level d is observed when the path
    reached depth d and some verified node sits at depth d, and accepted when the path went
    deeper. The per-level acceptance of a tree (chains: the same as `acceptance_labels`)."""
    if record.drafts.parents is None:
        return acceptance_labels(record)
    depth = record.drafts.depth()
    k = depth.shape[1]
    verified = torch.arange(k)[None, :] < record.verify_len.long().cpu()[:, None]
    levels = int(depth.max()) + 1 if k else 0
    reach = record.outcome.accepted.long().cpu()[:, None]  # path length
    d = torch.arange(levels)[None, :]
    has_node = torch.stack([(verified & (depth == j)).any(1) for j in range(levels)], 1) if levels else verified[:, :0]
    return (d <= reach) & has_node, (d < reach).float()


def tree_level_labels(record: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """`level_labels`, but level d counts only where every drafted child of the accepted path's
    node at level d - 1 (the root for d = 0) was verified: a step whose verification cut a
    level's alternatives (`GlobalTreeAllocation`) says how often its cut passes, not how often
    the level as drafted does; and only on rows that drafted a tree (a node with a sibling),
    not a chain beside the trees of others. Chains: `acceptance_labels`."""
    observed, label = level_labels(record)
    d, path = record.drafts, record.outcome.path
    if d.parents is None or path is None:
        return observed, label
    parents = d.parents.cpu()
    b, k = parents.shape
    index = torch.arange(k)[None, :]
    drafted = index < d.draft_len.long().cpu()[:, None]
    verified = index < record.verify_len.long().cpu()[:, None]
    depth, path = d.depth(), path.cpu()
    observed &= (_later_sibling(parents) & drafted).any(1, keepdim=True)  # a row drafting a chain: no tree level
    node = torch.full((b,), -1)  # the path's node at the level above (-1: the root)
    for j in range(observed.shape[1]):
        children = drafted & (parents == node[:, None])
        observed[:, j] &= ~(children & ~verified).any(1)
        on = path & (depth == j)
        node = torch.where(on.any(1), on.long().argmax(1), torch.full((b,), -2))  # -2: the path ended
    return observed, label


def _later_sibling(parents: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: the node has a sibling before it (it is not its parent's first child)."""
    k = parents.shape[1]
    if k == 0:
        return torch.zeros_like(parents, dtype=torch.bool)
    return torch.stack([(parents[:, :j] == parents[:, j : j + 1]).any(1) for j in range(k)], 1)


def first_child_labels(record: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed [B, D], accepted [B, D]) of a tree step's *chain* positions: at each level, the
    first drafted child of the accepted path's node (the draft's own first choice, as a chain
    drafts it: greedy, its argmax; sampled, its first draw) is observed when verified, and
    accepted when on the path. Chains: `acceptance_labels`."""
    d, path = record.drafts, record.outcome.path
    if d.parents is None or path is None:
        return acceptance_labels(record)
    observed, accepted = acceptance_labels(record)  # per node
    parents = d.parents.cpu()
    k = parents.shape[1]
    first = ~_later_sibling(parents)
    depth = d.depth()
    levels = int(depth.max()) + 1 if k else 0
    seen = observed & first
    took = seen & (accepted > 0)
    if not levels:
        return seen[:, :0], accepted[:, :0]
    at = [depth == j for j in range(levels)]
    return torch.stack([(seen & a).any(1) for a in at], 1), torch.stack([(took & a).any(1) for a in at], 1).float()


class RecentAcceptance:
    """Each request's recent acceptance rate: an exponential moving average of its labels."""

    def __init__(self, decay: float = 0.8, prior: float = 0.5) -> None:
        self.decay, self.prior = decay, prior
        self.rate: dict[str, float] = {}

    def __call__(self, request_ids: tuple[str, ...]) -> torch.Tensor:
        return torch.tensor([self.rate.get(r, self.prior) for r in request_ids], dtype=torch.float32)

    def update(self, record: StepRecord) -> None:
        observed, label = acceptance_labels(record)
        for i, rid in enumerate(record.drafts.request_ids):
            n = int(observed[i].sum())
            if n:
                mean = float(label[i][observed[i]].mean())
                w = self.decay**n
                self.rate[rid] = w * self.rate.get(rid, self.prior) + (1 - w) * mean
        for rid in record.outcome.finished:
            self.rate.pop(rid, None)
