"""BatchKV: holes, row moves, compaction and token-tree masks give the logits of plain forwards."""

from __future__ import annotations

import pytest
import torch

from adactl.runtime import BatchKV, KVConfig

ATOL = 1e-4


def plain_logits(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    """[len(seq), V] logits of one unbatched, uncached forward."""
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


def append(kv: BatchKV, model: torch.nn.Module, rows: list[list[int]], keep: list[int] | None = None) -> torch.Tensor:
    """Feed each row its own number of new tokens (right-padded); optionally keep only a prefix."""
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
    valid = torch.arange(t)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    with torch.no_grad():
        logits = kv.forward(model, ids, valid).logits
    if keep is not None:
        kv.keep_last(torch.arange(t)[None, :] < torch.tensor(keep)[:, None])
    return logits


def test_holes_and_ragged_rows_give_plain_logits(target):
    kv = BatchKV(2, config=KVConfig(min_compact_cols=10_000))  # no compaction: holes stay
    kv.new_rows(3)
    seqs = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    append(kv, target, seqs)
    # each row drafts some tokens; only a prefix is kept, the rest become holes
    drafts = [[11, 12, 13], [14], [15, 16]]
    keep = [1, 0, 2]
    append(kv, target, drafts, keep=keep)
    seqs = [s + d[:k] for s, d, k in zip(seqs, drafts, keep)]
    assert kv.row_lengths().tolist() == [len(s) for s in seqs]
    new = [[20, 21], [22, 23, 24], [25]]
    logits = append(kv, target, new)
    for i, (s, n) in enumerate(zip(seqs, new)):
        expected = plain_logits(target, s + n)[len(s) :]
        assert torch.allclose(logits[i, : len(n)], expected, atol=ATOL)


def test_compaction_and_row_moves_keep_logits(target):
    kv = BatchKV(2, config=KVConfig(min_compact_cols=1, compact_waste=0.0))
    kv.new_rows(4)
    seqs = [[3, 4], [5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    append(kv, target, seqs)
    append(kv, target, [[1, 2, 3, 4]] * 4, keep=[0, 4, 1, 2])
    seqs = [s + [1, 2, 3, 4][:k] for s, k in zip(seqs, [0, 4, 1, 2])]
    kv.permute([3, 1, 0])  # drop row 2, reorder the rest (compacts too: compact_waste=0)
    seqs = [seqs[3], seqs[1], seqs[0]]
    assert kv.n_cols == max(len(s) for s in seqs)
    logits = append(kv, target, [[7], [8], [9]])
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], plain_logits(target, s + [[7], [8], [9]][i])[-1], atol=ATOL)


def test_pack_drops_holes_below_the_compaction_threshold_and_keeps_logits(target):
    """`pack` compacts however few holes there are (the profiler packs before each round, so
    a round's steps attend over the width its rows need, not what earlier drafts left)."""
    kv = BatchKV(2, config=KVConfig(min_compact_cols=10_000))  # maybe_compact never would
    kv.new_rows(2)
    seqs = [[3, 4, 5], [6, 7, 8, 9]]
    append(kv, target, seqs)
    append(kv, target, [[1, 2, 3]] * 2, keep=[1, 0])  # row 0 wrote after column 3, a hole (row 1 was longer)
    seqs = [seqs[0] + [1], seqs[1]]
    assert kv.n_cols == 5 and kv.pack() and kv.n_cols == 4 and not kv.pack()  # nothing left to move
    logits = append(kv, target, [[7], [8]])
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], plain_logits(target, s + [[7], [8]][i])[-1], atol=ATOL)


def test_add_row_from_another_cache(target):
    main = BatchKV(2)
    main.new_rows(1)
    append(main, target, [[1, 2, 3, 4, 5, 6, 7, 8]])
    side = BatchKV(2)
    side.new_rows(1)
    append(side, target, [[9, 10, 11]])
    main.add_row(side)
    logits = append(main, target, [[4], [5]])
    assert torch.allclose(logits[0, 0], plain_logits(target, [1, 2, 3, 4, 5, 6, 7, 8, 4])[-1], atol=ATOL)
    assert torch.allclose(logits[1, 0], plain_logits(target, [9, 10, 11, 5])[-1], atol=ATOL)


def test_prefix_forward_leaves_other_rows_untouched(target):
    kv = BatchKV(2)
    kv.new_rows(2)
    append(kv, target, [[1, 2], [3, 4, 5]])
    with torch.no_grad():
        kv.forward(target, torch.tensor([[6]]), torch.tensor([[True]]))  # row 0 only
    assert kv.row_lengths().tolist() == [3, 3]
    logits = append(kv, target, [[7], [8]])
    assert torch.allclose(logits[1, 0], plain_logits(target, [3, 4, 5, 8])[-1], atol=ATOL)


def test_token_tree_matches_chains_at_batch_2_with_holes(target):
    """A 4-D tree mask with depth positions gives each node the logits of its path."""
    kv = BatchKV(2, config=KVConfig(min_compact_cols=10_000))
    kv.new_rows(2)
    ctx = [[5, 6, 7], [8, 9]]
    append(kv, target, ctx)
    append(kv, target, [[30, 31], [32]], keep=[0, 0])  # holes in both rows
    # row 0 tree: 0 -> (1 -> 3, 2); row 1 tree: 0 -> 1 -> 2, and padding
    tokens = torch.tensor([[40, 41, 42, 43], [44, 45, 46, 0]])
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -1]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    with torch.no_grad():
        logits = kv.forward(target, tokens, valid, parents=parents).logits
    paths = {
        (0, 0): [40],
        (0, 1): [40, 41],
        (0, 2): [40, 42],
        (0, 3): [40, 41, 43],
        (1, 0): [44],
        (1, 1): [44, 45],
        (1, 2): [44, 45, 46],
    }
    for (row, node), path in paths.items():
        expected = plain_logits(target, ctx[row] + path)[-1]
        assert torch.allclose(logits[row, node], expected, atol=ATOL), (row, node)


def test_growth_copies_the_used_block_and_zeroes_the_rest(target):
    """A growth copies only the used block into uninitialised memory and zeroes the rest: freed
    buffers full of NaN, handed back by the allocator, must not reach a masked column (0 x NaN
    is NaN in attention's P @ V)."""
    kv = BatchKV(2, config=KVConfig(min_col_growth=1, col_headroom=0.0))
    kv.new_rows(2)
    seqs = [[3, 4, 5], [6, 7]]
    append(kv, target, seqs)
    for grow in range(1, 6):
        for layer in kv.layers:  # poison every slot outside the used block, then grow
            for buf in (layer.k_buf, layer.v_buf):
                used = buf[: kv.n_rows, :, : kv.n_cols].clone()
                buf.fill_(float("nan"))
                buf[: kv.n_rows, :, : kv.n_cols] = used
        before = [layer.k_buf[: kv.n_rows, :, : kv.n_cols].clone() for layer in kv.layers]
        kv.reserve(2 + grow, kv.capacity[1] + grow)
        for layer, old in zip(kv.layers, before):
            for buf in (layer.k_buf, layer.v_buf):
                rest = buf.clone()
                rest[: kv.n_rows, :, : kv.n_cols] = 0
                assert not rest.isnan().any() and not rest.any()
            assert torch.equal(layer.k_buf[: kv.n_rows, :, : kv.n_cols], old)
    logits = append(kv, target, [[8], [9]])
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], plain_logits(target, s + [[8], [9]][i])[-1], atol=ATOL)


def test_memory_returns_to_zero(target):
    kv = BatchKV(2)
    assert kv.nbytes() == 0
    kv.new_rows(3)
    append(kv, target, [[1, 2, 3]] * 3)
    assert kv.nbytes() > 0
    kv.permute([1])
    kv.permute([])
    assert kv.nbytes() == 0 and kv.n_rows == 0 and kv.n_cols == 0


def test_bad_calls_raise(target):
    kv = BatchKV(2)
    kv.new_rows(1)
    with pytest.raises(ValueError, match="rows"):
        kv.forward(target, torch.tensor([[1], [2]]), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="row order"):
        kv.permute([0, 0])


def test_row_ranges_share_columns(target):
    """Forwards on different row ranges write side by side: the width is the max, not the sum."""
    kv = BatchKV(2)
    kv.new_rows(4)
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16]]
    with torch.no_grad():
        kv.forward(target, torch.tensor(seqs[:2]), torch.ones(2, 5, dtype=torch.bool))
        kv.forward(target, torch.tensor(seqs[2:]), torch.ones(2, 3, dtype=torch.bool), first_row=2)
    assert kv.n_cols == 5 and kv.row_lengths().tolist() == [5, 5, 3, 3]
    logits = append(kv, target, [[20], [21], [22], [23]])
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], plain_logits(target, s + [20 + i])[-1], atol=ATOL)


def test_trailing_rejections_leave_no_holes(target, monkeypatch):
    """A single row whose drafts are cut at the end stays dense: the next forward writes over
    the rejected columns, with the model's own causal mask (no explicit mask), and gives the
    logits of a plain forward."""
    kv = BatchKV(2, config=KVConfig(min_compact_cols=10_000))
    kv.new_rows(1)
    seq = [5, 6, 7, 8]
    append(kv, target, [seq])
    for step, (draft, keep) in enumerate([([11, 12, 13, 14], 1), ([15, 16], 0), ([17, 18, 19], 3)]):
        append(kv, target, [draft], keep=[keep])
        seq = seq + draft[:keep]
        assert int(kv.used[0]) == int(kv.lengths[0]) == len(seq) == kv.n_cols, step
    masks = []
    original = target.forward

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "forward", spy)
    logits = append(kv, target, [[20, 21]])
    assert masks == [None]
    assert torch.allclose(logits[0], plain_logits(target, seq + [20, 21])[len(seq) :], atol=ATOL)


def test_masked_attention_folds_query_heads_instead_of_copying_kv_heads_and_leaves_the_model_as_it_was(target):
    """A masked forward of several tokens a row (a verify over holes and padding) runs SDPA
    over the key/value heads as they are, the query heads that share one folded into its query
    rows, not transformers' copy of every key/value head, and gives the same logits; the
    model's own attention setting is back after (so `generate` on the same model is untouched)."""
    import adactl.runtime.attention as attention

    assert target.config.num_key_value_heads < target.config.num_attention_heads  # grouped heads
    calls = []
    original = attention.torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1]))  # the heads SDPA was given
        return original(query, key, *args, **kwargs)

    rows = [[5, 6, 7, 8, 9], [10, 11]]
    logits = {}
    for name in ("ours", "transformers"):
        kv = BatchKV(2)
        kv.new_rows(2)
        append(kv, target, rows)
        if name == "transformers":  # the same forwards with our switch off
            registered, attention._registered = attention._registered, False
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(attention.torch.nn.functional, "scaled_dot_product_attention", spy)
                logits[name] = append(kv, target, [[20, 21, 22], [23, 24, 25]])
        finally:
            if name == "transformers":
                attention._registered = registered
        assert target.config._attn_implementation == "sdpa"
    assert torch.allclose(logits["ours"], logits["transformers"], atol=ATOL)
    n, heads, kv_heads = (target.config.num_hidden_layers, target.config.num_attention_heads,
                          target.config.num_key_value_heads)  # fmt: skip
    assert calls[:n] == [(kv_heads, kv_heads)] * n and calls[n:] == [(heads, heads)] * n


@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize("kind", ["bool", "additive", "one-row-for-all"])
def test_folded_attention_equals_attention_over_copied_kv_heads(tokens, kind):
    """`folded_sdpa` against SDPA over `repeat_kv`'s copies (transformers' path), for masks with
    holes per row and per token, additive masks, and one mask broadcast over the batch."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from adactl.runtime.attention import folded_sdpa

    gen = torch.Generator().manual_seed(tokens)
    b, heads, kv_heads, s, d = 3, 12, 4, 17, 8
    query = torch.randn(b, tokens, heads, d, generator=gen).transpose(1, 2)  # strided, as the models pass it
    key, value = torch.randn(2, b, kv_heads, s, d, generator=gen)
    mask = torch.rand(1 if kind == "one-row-for-all" else b, 1, tokens, s, generator=gen) > 0.3
    mask[..., -1] = True  # every query sees something
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=mask, scale=0.3
    )
    assert torch.allclose(folded_sdpa(query, key, value, mask, scale=0.3), want, atol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        five = key[:, :1].expand(b, 5, s, d)  # 12 query heads do not share 5
        folded_sdpa(query, five, five, mask)


def test_attention_switches_where_transformers_would_copy():
    """CPU: masked forwards of more than one token a row (one token: transformers folds or the
    kernel takes it); CUDA: every masked forward; never without a mask or on MPS."""
    from adactl.runtime.attention import _UNCHANGED, gqa_attention

    model = torch.nn.Linear(1, 1)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert gqa_attention(model, cpu, True, 2) is not _UNCHANGED
    assert gqa_attention(model, cpu, True, 1) is _UNCHANGED
    assert gqa_attention(model, cpu, False, 5) is _UNCHANGED
    assert gqa_attention(model, cuda, True, 1) is not _UNCHANGED
    assert gqa_attention(model, cuda, False, 1) is _UNCHANGED
    assert gqa_attention(model, mps, True, 5) is _UNCHANGED
