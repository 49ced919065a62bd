"""The CPU's float32 `linear` row padding (`adactl.runtime.row_padding`): the table measured per
machine, applied per layer shape, invisible in the engine's outputs."""

from __future__ import annotations

import json

import pytest
import torch

from adactl.runtime import SamplingParams, StepPlan, run_to_completion
from adactl.runtime import row_padding as rp

from .helpers import greedy_reference, make_engine, prompts


def test_choose_rows_pads_only_to_a_clearly_faster_count():
    # the AVX-512 Xeon's output layer (ms): 1-3 rows fast, 4-15 in slow steps of 3, 16 fast again
    head = [4.0, 3.9, 4.3, 7.9, 8.3, 8.6, 12.2, 12.1, 12.9, 16.2, 16.5, 17.0, 19.6, 20.2, 20.4, 9.7, 10.1, 9.6, 9.2]
    chosen = rp.choose_rows(head)
    assert chosen[:6] == (1, 2, 3, 4, 5, 6)  # 16 rows (9.7) is not 10% faster than 4-6 rows
    assert chosen[6:15] == (16,) * 9  # 7-15 rows: 16, the smallest within 10% of the fastest (19 rows, 9.2)
    assert chosen[15:] == (16, 17, 18, 19)  # 17 and 18 are within 10% of 19's
    # the AVX2 machine's model (2 and 3 rows slower than 5): padded to 5
    assert rp.choose_rows([61, 99, 124, 95, 80, 85]) == (1, 5, 5, 5, 5, 6)
    assert rp.choose_rows([1.0, 1.0, 1.0]) == (1, 2, 3)  # nothing faster: nothing padded


def test_rows_past_the_table_pad_by_residue():
    table = rp.RowPadding({(8, 4): (1, 2, 4, 4, 5, 8, 8, 8)})  # 6, 7 -> 8; 5 stays
    assert [table.rows(r, (8, 4)) for r in range(1, 9)] == [1, 2, 4, 4, 5, 8, 8, 8]
    assert [table.rows(r, (8, 4)) for r in (9, 10, 11, 12, 13, 14, 15)] == [9, 12, 12, 12, 13, 16, 16]
    assert table.rows(3, (2, 2)) == 3  # a shape without a table: unpadded
    assert table.pads(3) and not table.pads(5)
    assert rp.RowPadding.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError):
        rp.RowPadding.from_dict({"8x4": [1, 1, 3]})  # 2 rows computed as 1: not a table of ours


def _forced(model: torch.nn.Module) -> rp.RowPadding:
    """2 and 3 rows computed as 5 in every layer, the output layer's 6 and 7 as 8 (the old rule)."""
    targets = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            head = m is model.get_output_embeddings()
            targets[(m.out_features, m.in_features)] = (1, 5, 5, 4, 5, 8 if head else 6, 8 if head else 7, 8)
    return rp.RowPadding(targets)


@pytest.mark.parametrize("rows", range(1, 10))
def test_padded_layers_see_the_tables_rows_and_return_the_unpadded_result(target, rows):
    head, body = target.get_output_embeddings(), target.model.layers[0].mlp.gate_proj
    table = _forced(target)
    rp.set_row_padding(target, table)
    try:
        for layer in (head, body):
            x = torch.randn(1, rows, layer.in_features)
            seen: list[int] = []
            with rp.padded_linears(target):
                probe = layer.register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.append(a[0].numel() // a[0].shape[-1])
                )
                y = layer(x)
                probe.remove()
            assert seen == [table.rows(rows, (layer.out_features, layer.in_features))]
            assert y.shape == (1, rows, layer.out_features)
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
            assert not layer._forward_hooks and not layer._forward_pre_hooks
        assert (rp.padded_linears(target, rows) is rp._UNPADDED) == (not table.pads(rows))
    finally:
        rp.set_row_padding(target, rp.NONE)


@pytest.mark.parametrize("draft_len", [1, 2, 4])
def test_padded_engine_still_matches_generate(target, draft, draft_len):
    """Greedy speculative decoding with every small row count padded reproduces `generate`."""
    chosen = prompts(3, seed=11)
    refs = [greedy_reference(target, p, 16) for p in chosen]
    rp.set_row_padding(target, _forced(target))
    try:
        engine = make_engine(target, draft)
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in chosen]
        results = run_to_completion(engine, StepPlan(draft_len=draft_len))
    finally:
        rp.set_row_padding(target, rp.NONE)
    assert [results[i].output_ids for i in ids] == refs


def test_tiny_models_are_not_measured(target):
    assert not rp._eligible(target)  # its weights fit a cache: nothing to gain, nothing measured


def test_a_large_model_is_measured_once_and_cached(tmp_path, monkeypatch):
    """A model over `MIN_BYTES` of float32 linear weights gets a measured table, written to the
    cache; another process (here: the in-process table forgotten) reads it instead of measuring."""
    monkeypatch.setenv("ADACTL_CACHE", str(tmp_path))
    monkeypatch.setattr(rp, "TUNED_ROWS", 8)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048, bias=False))
    assert rp._eligible(model)
    table = rp.row_padding(model)
    files = list((tmp_path / "row_padding").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert set(record["targets"]) == {"2048x2048"} and len(record["seconds"]["2048x2048"]) == 8
    assert all(t >= m for m, t in enumerate(table.targets[(2048, 2048)], 1))
    record["targets"]["2048x2048"] = [8] * 8  # what the next process finds there is what it uses
    files[0].write_text(json.dumps(record))
    rp._TABLES.pop(model)
    monkeypatch.setattr(rp, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert rp.row_padding(model).rows(3, (2048, 2048)) == 8


def test_a_model_moved_off_float32_is_not_padded(target):
    """The table is the float32 CPU kernels'; a model converted since runs unpadded."""
    import copy

    model = copy.deepcopy(target).to(torch.bfloat16)
    rp.set_row_padding(model, _forced(model))
    assert rp.padded_linears(model, 2) is rp._UNPADDED
    rp.set_row_padding(model, _forced(model))
    model.float()
    assert rp.padded_linears(model, 2) is not rp._UNPADDED
