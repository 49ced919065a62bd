"""The proposer: runs the draft model to propose each row's draft chain or token tree.

Everything stays on the device: draft tokens are sampled there and fed straight back into the
next draft forward, and the distributions they were drawn from are kept there for
verification; the host sees the drafts once, at the verify decision point (the engine's
`DraftBatch`). Tree growth is bookkeeping on the host (`adactl.runtime.tree`): its levels
bring their distributions over, one copy per level.

A feature draft (EAGLE-style, `adactl.runtime.feature_draft`) proposes from its own
vocabulary and reads the target's features; a plain draft is any causal LM on the target's
tokenizer. A draft run with its companion (Speculative Verification) also reports the
companion's distribution at every draft position.
"""

from __future__ import annotations

from typing import Any

import torch

from .feature_draft import is_feature_draft
from .kv import BatchKV
from .rows import Request, RowSampling
from .steps import Drafts, Verdict
from .tree import RowTree
from .types import TreeSpec


class Proposer:
    """Drafts chains and trees with one draft model, on the rows of a draft `BatchKV`."""

    def __init__(self, model: Any, vocab_size: int, device: torch.device) -> None:
        self.model, self.vocab_size, self.device = model, vocab_size, device
        self.feature = is_feature_draft(model)
        vocab = torch.as_tensor(model.vocab_ids).cpu() if self.feature else None
        self.support = vocab  # [N] target ids a feature draft can propose (None: all)
        self._vocab = vocab.to(device) if vocab is not None else None
        comp = getattr(model, "companion_vocab_ids", None)
        self._companion_vocab = torch.as_tensor(comp).to(device) if comp is not None else None

    @property
    def with_companion(self) -> bool:
        return self._companion_vocab is not None

    def _scatter(self, dist: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
        """[..., N] over a draft vocabulary -> [..., V] over the target's (0 elsewhere)."""
        if vocab is None:
            return dist
        out = dist.new_zeros(*dist.shape[:-1], self.vocab_size)
        self._scatter_into(out, dist, vocab)
        return out

    @staticmethod
    def _scatter_into(out: torch.Tensor, dist: torch.Tensor, vocab: torch.Tensor | None) -> None:
        """`_scatter`, written into `out` [..., V] (zeros where the vocabulary has no token).
        `scatter_` along the last dimension, not `index_copy_`: on the CPU the latter takes
        twice as long (1.2 against 0.6 ms for [16, 4] rows of an 8,192-token draft vocabulary
        into 49,152, one thread), once or more every step."""
        if vocab is None:
            out.copy_(dist)
        else:
            out.scatter_(-1, vocab.expand(dist.shape), dist)

    def catch_up(self, kv: BatchKV, rows: list[Request]) -> Any:
        """The first draft forward of a step, on the first len(rows) rows: it feeds every token
        the draft cache has not seen (one, or two after a fully accepted chain, more after
        steps without speculation or after a tree; for a feature draft, every token accepted
        in the last step, now with the target's true features). Returns the draft's output."""
        pending = [r.draft_pending for r in rows]
        width = max(len(p) for p in pending)
        # left-padded, so that every row's last token sits in the last column
        ids = torch.tensor([[0] * (width - len(p)) + p for p in pending])
        valid = None  # (every slot real: no padding)
        if any(len(p) < width for p in pending):
            valid = torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in pending])[:, None]
        extra: dict[str, Any] = {}
        if self.feature:
            dtype = next((c.dtype for r in rows for c in r.draft_features), None)
            size = self.model.hidden_size
            zeros = torch.zeros(width, size, device=self.device, dtype=dtype)
            parts = []  # row by row, left-padded: the padding, then the row's chunks (one copy in all)
            for r in rows:
                parts.append(zeros[: width - sum(c.shape[0] for c in r.draft_features)])
                parts.extend(r.draft_features)
                r.draft_features = []
            extra["features"] = torch.cat(parts).view(len(rows), width, size)
        out = kv.forward(self.model, ids.to(self.device), valid, logits_to_keep=1, **extra)
        for r in rows:
            r.draft_pending = []
        return out

    def chains(self, kv: BatchKV, rows: list[Request], lens: torch.Tensor, n_rows: int) -> Drafts:
        """Draft `lens[i]` tokens (on the CPU) for each of `rows`, the first rows of the cache,
        sorted by length, longest first; `n_rows` decode rows in all."""
        n = len(rows)
        k = int(lens.max()) if n else 0
        tokens = torch.full((n_rows, k), -1, dtype=torch.long, device=self.device)
        probs = torch.zeros(n_rows, k, self.vocab_size, device=self.device)
        comp_probs = torch.zeros_like(probs) if self.with_companion else None
        if n == 0:
            return Drafts(tokens, probs, comp_probs)
        sampling = RowSampling(rows, self.device)
        # row i's draws for its lens[i] positions in one pass (the same numbers, one at a time)
        host_lens = lens.tolist()
        uniforms = sampling.uniforms(host_lens, k)
        out = self.catch_up(kv, rows)
        drawn: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (rows m, their tokens [m], q [m, N]) per position
        for j in range(k):
            m = sum(1 for x in host_lens if x > j)  # rows still drafting: a prefix, since rows are sorted
            if j > 0:
                extra = {"features": out.hidden_states[:m, -1:]} if self.feature else {}
                out = kv.forward(self.model, drawn[-1][1][:m, None], None, **extra)  # (every slot real)
            s = sampling.head(m)
            q = s.process(out.logits[:, -1])  # [m, N] (the forward ran on these m rows)
            if comp_probs is not None:
                self._scatter_into(comp_probs[:m, j], s.process(out.companion_logits[:, -1]), self._companion_vocab)
            picked = s.sample(q, uniforms[:m, j])
            drawn.append((m, self._vocab[picked] if self._vocab is not None else picked, q))
        if all(m == n for m, _, _ in drawn):  # every row drafted k: the step's tokens and q in one write each
            tokens[:n] = torch.stack([x for _, x, _ in drawn], 1)
            self._scatter_into(probs[:n], torch.stack([q for _, _, q in drawn], 1), self._vocab)
        else:
            for j, (m, x, q) in enumerate(drawn):
                tokens[:m, j] = x
                self._scatter_into(probs[:m, j], q, self._vocab)
        return Drafts(tokens, probs, comp_probs)

    def settle(
        self, kv: BatchKV, rows: list[Request], drafting: int, drafts: torch.Tensor, draft_len: torch.Tensor,
        verdict: Verdict, new: list[list[int]],
    ) -> None:  # fmt: skip
        """After verification: the draft cache keeps each chain's accepted tokens, and each of
        `rows` (the decode rows; the first `drafting` drafted) holds what the draft has not
        seen yet. drafts, draft_len: the step's tokens [rows, K] and lengths (CPU); new: the
        tokens each row emitted (accepted drafts, then the target's)."""
        k = drafts.shape[1]
        trees = verdict.path is not None
        nodes = verdict.nodes
        if self.feature:
            assert verdict.features is not None
            if not trees:
                # a chain's are positions 0..a: one copy of the step's first positions for all
                # rows and a view of it per row (copied: a view of `verdict.features` would keep
                # the whole step's [rows, T, H] states alive; the copy lives while a row that
                # has not caught up holds a view, so rows that did not draft while others did
                # take their own)
                last = max((len(x) for x in nodes), default=0) + 1
                kept = verdict.features[:, :last].clone().unbind(0)
        if not trees and drafting and k > 1:
            # the draft cache holds d_1 .. d_{K-1} in its last K-1 columns; keep the accepted
            # ones (a feature draft keeps none: they are fed again with the target's features;
            # a tree's levels already left the draft cache)
            if self.feature:
                keep = torch.zeros(drafting, k - 1, dtype=torch.bool)
            else:
                keep = torch.arange(1, k)[None, :] <= verdict.accepted[:drafting, None]
            kv.keep_last(keep)
        for i, req in enumerate(rows):
            drafted, y = i < drafting, new[i][-1]
            if self.feature:
                # tokens y_0 (already in the draft cache unless the row did not draft), d_1..d_a, y
                # pair with the target features computed at y_0, d_1, .., d_a
                assert verdict.features is not None
                req.draft_pending = ([] if drafted else req.draft_pending) + new[i]
                if trees:
                    states = verdict.features[i, [0] + [j + 1 for j in nodes[i]]].clone()
                elif drafted or not drafting:  # (the next catch-up frees it; or every row shares it)
                    states = kept[i][: len(nodes[i]) + 1]
                else:  # a row that waits while others draft would keep their positions alive: its own copy
                    states = kept[i][: len(nodes[i]) + 1].clone()
                req.draft_features = ([] if drafted else req.draft_features) + [states]
            elif trees and drafted:
                req.draft_pending = new[i]  # a tree's levels left the draft cache: feed the path again
            elif drafted:
                a, n = int(verdict.accepted[i]), int(draft_len[i])
                req.draft_pending = [int(drafts[i, n - 1]), y] if a == n else [y]
            else:
                req.draft_pending.append(y)

    def trees(self, kv: BatchKV, rows: list[Request], specs: list[TreeSpec], n_rows: int) -> Drafts:
        """Grow a token tree (`adactl.runtime.tree`) for each of `rows` (the first rows of the
        cache, sorted deepest first). Level by level, the nodes to expand are fed to the draft
        model in one forward; each sees its row's context and its own ancestors (cached by
        earlier levels), at position context + depth. The levels are scratch: once the tree
        is built they leave the draft cache, and the accepted path is fed again next step."""
        n = len(rows)
        trees = [RowTree(spec, r.sampling.temperature <= 0) for spec, r in zip(specs, rows)]
        dists: list[list[torch.Tensor]] = [[] for _ in range(n)]  # each tree's distributions, on the device
        hidden: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]  # feature drafts: g at each expanded node
        if n:
            sampling = RowSampling(rows, self.device)
            out = self.catch_up(kv, rows)
            q = sampling.process(out.logits[:, -1])  # [n, N]
            q_host = q.cpu()
            root = out.hidden_states[:, -1] if self.feature else None  # [n, H]
            width = max(s.width for s in specs)
            u = sampling.uniforms([s.width for s in specs], width).cpu()
            for i, tree in enumerate(trees):
                tree.propose(-1, q_host[i], u[i])
                dists[i].append(q[i])
            start = kv.used_cols(0, n)  # columns from here on are this step's scratch
            context_len = kv.row_lengths()[:n].clone()
            for level in range(max(s.depth for s in specs) - 1):
                m = sum(1 for s in specs if s.depth > level + 1)  # rows still growing: a prefix
                fronts = [trees[i].frontier(level) for i in range(m)]
                w = max(len(f) for f in fronts)
                c = kv.next_col(0, m)
                ids = torch.zeros(m, w, dtype=torch.long)
                valid = torch.zeros(m, w, dtype=torch.bool)
                context = kv.visible_before(start[:m], c)[:, None, :].repeat(1, w, 1)  # [m, w, c] (host)
                feats = (torch.zeros(m, w, self.model.hidden_size, device=self.device, dtype=root.dtype)
                         if root is not None else None)  # fmt: skip
                for i, front in enumerate(fronts):
                    for s, node_id in enumerate(front):
                        node = trees[i].nodes[node_id]
                        # (a feature draft's node tokens index its own vocabulary: fed as target ids)
                        ids[i, s] = int(self.support[node.token]) if self.support is not None else node.token
                        valid[i, s] = True
                        ancestor = node.parent
                        while ancestor >= 0:
                            context[i, s, trees[i].nodes[ancestor].col] = True
                            ancestor = trees[i].nodes[ancestor].parent
                        if feats is not None and root is not None:
                            feats[i, s] = hidden[i][node.parent] if node.parent >= 0 else root[i]
                positions = (context_len[:m, None] + level).expand(m, w)
                extra: dict[str, Any] = {"features": feats} if feats is not None else {}
                roots = torch.full((m, w), -1)  # levels attach through `context`
                out = kv.forward(
                    self.model, ids.to(self.device), valid, parents=roots, context=context, positions=positions,
                    **extra,
                )  # fmt: skip
                head = sampling.head(m)
                q = head.process(out.logits)  # [m, w, N]
                q_host = q.cpu()
                u = head.uniforms([len(f) * specs[i].width for i, f in enumerate(fronts)], w * width).cpu()
                for i, front in enumerate(fronts):
                    for s, node_id in enumerate(front):
                        trees[i].nodes[node_id].col = c + s
                        if self.feature:
                            hidden[i][node_id] = out.hidden_states[i, s]
                        trees[i].propose(node_id, q_host[i, s], u[i, s * specs[i].width :])
                        dists[i].append(q[i, s])
            kv.drop_from(start)
        k = max((min(s.nodes, len(t.nodes)) for s, t in zip(specs, trees)), default=0)
        tokens = torch.full((n_rows, k), -1, dtype=torch.long)
        probs = torch.zeros(n_rows, k, self.vocab_size, device=self.device)
        parents = torch.full((n_rows, k), -1, dtype=torch.long)
        for i, tree in enumerate(trees):
            kept = tree.best()
            if not kept:
                continue
            index = {node_id: j for j, node_id in enumerate(kept)}
            nodes = [tree.nodes[node_id] for node_id in kept]
            drafted = torch.tensor([node.token for node in nodes])
            tokens[i, : len(kept)] = self.support[drafted] if self.support is not None else drafted
            picked = torch.stack(dists[i])[torch.tensor([node.dist for node in nodes], device=self.device)]
            probs[i, : len(kept)] = self._scatter(picked, self._vocab)
            parents[i, : len(kept)] = torch.tensor([index[node.parent] if node.parent >= 0 else -1 for node in nodes])
        return Drafts(tokens.to(self.device), probs, None, parents)
