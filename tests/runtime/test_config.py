"""ParallelConfig validation, stage splits and micro-batch narrowing (no Ray)."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.engine import HookedModel, Intervention, patch, steer, zero
from interplab.runtime import ParallelConfig, SplitError, StageError, build_backend
from interplab.runtime.microbatch import narrow_interventions, row_ranges, slice_batch
from interplab.analyses.patching import layer_work
from interplab.runtime.split import (
    LayerWork,
    ModelBytes,
    balance,
    balance_work,
    model_bytes,
    resolve_stages,
    split_by_memory,
    split_even,
)
from tests.runtime.helpers import CLEAN


# ---------------------------------------------------------------------------- config
def test_config_defaults_and_forms():
    assert ParallelConfig().single_process
    assert ParallelConfig(stages=[[0, 3]]).single_process
    assert not ParallelConfig(stages=1, replicas=2).single_process
    assert ParallelConfig.model_validate({"stages": "auto", "gpus_per_stage": 0.5}).stages == "auto"
    assert ParallelConfig.model_validate({"stages": [[0, 12], [12, 30]]}).stages == [[0, 12], [12, 30]]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"stages": 0}, "at least 1"),
        ({"stages": "many"}, "'auto'"),
        ({"stages": [[0, 12], [13, 30]]}, "must start at layer 12"),
        ({"stages": [[0, 0]]}, "is empty"),
        ({"stages": [[0, 1, 2]]}, r"\[start, stop\]"),
        ({"replicas": 0}, "replicas"),
        ({"gpus_per_stage": 1.5}, "whole number"),
        ({"gpus": 1}, "gpus"),  # unknown key
    ],
)
def test_config_errors_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig.model_validate(spec)


def test_explicit_ranges_must_cover_the_model():
    with pytest.raises(ValueError, match="model has 30 layers"):
        resolve_stages(ParallelConfig(stages=[[0, 12], [12, 20]]), 30)


# ---------------------------------------------------------------------------- splits
def test_split_even():
    assert split_even(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_even(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(SplitError, match="only 3 layers"):
        split_even(3, 4)


def test_balance_accounts_for_embedding_and_head():
    sizes = ModelBytes(layers=(10,) * 8, embed=40, head=40)
    ranges = balance(sizes, 2)
    assert ranges == [(0, 4), (4, 8)]  # symmetric
    sizes = ModelBytes(layers=(10,) * 8, embed=40, head=0)
    assert balance(sizes, 2) == [(0, 2), (2, 8)]  # the embedding weighs on stage 0


def test_balance_work_minimises_the_busiest_stage():
    # a layer sweep on SmolLM2's 30 layers: layer l runs the rows of layers 0..l
    work = layer_work(30, "exact")
    assert work.layers == tuple(float(l + 1) for l in range(30)) and work.last == 0
    ranges = balance_work(work.layers, 2)
    assert ranges == [(0, 21), (21, 30)]  # 231 vs 234 units of work; even layers would be 120 vs 345
    assert balance_work(work.layers, 3) == [(0, 17), (17, 24), (24, 30)]
    assert balance_work([1.0] * 8, 2) == split_even(8, 2)
    assert balance_work([1.0] * 8, 2, first=4) == [(0, 2), (2, 8)]
    assert layer_work(30, "atp") is None  # whole passes: nothing to balance
    with pytest.raises(SplitError, match="use at most 3"):
        balance_work([1.0] * 3, 4)


def test_resolve_stages_balances_a_count_by_work_unless_told_layers():
    work = LayerWork((5.0, 1.0, 1.0, 1.0))
    assert resolve_stages(ParallelConfig(stages=2), 4, work=work) == [(0, 1), (1, 4)]
    assert resolve_stages(ParallelConfig(stages=2, balance="layers"), 4, work=work) == [(0, 2), (2, 4)]
    assert resolve_stages(ParallelConfig(stages=2), 4) == [(0, 2), (2, 4)]  # no work declared: even
    assert resolve_stages(ParallelConfig(stages=[[0, 3], [3, 4]]), 4, work=work) == [(0, 3), (3, 4)]  # explicit wins
    with pytest.raises(SplitError, match="2 layers for a model with 4"):
        resolve_stages(ParallelConfig(stages=2), 4, work=LayerWork((1.0, 2.0)))
    for bad in ((0.0, 0.0), (1.0, -1.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="non-negative"):
            LayerWork(bad)
    with pytest.raises(ValueError, match="balance"):
        ParallelConfig.model_validate({"stages": 2, "balance": "flops"})


def test_split_by_memory_picks_fewest_stages_that_fit():
    sizes = ModelBytes(layers=(100,) * 10, embed=200, head=200)  # 1400 total
    assert split_by_memory(sizes, capacity=2000) == [(0, 10)]
    ranges = split_by_memory(sizes, capacity=1000)  # 800 usable per stage
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[-1][1] == 10
    with pytest.raises(SplitError, match="does not fit"):
        split_by_memory(sizes, capacity=300)


def test_model_bytes_of_a_meta_skeleton():
    from interplab.runtime.skeleton import load_skeleton

    tiny = load_model("tiny-llama")
    sizes = model_bytes(tiny)
    assert len(sizes.layers) == 3 and all(b > 0 for b in sizes.layers)
    assert sizes.head == sizes.embed + 4 * tiny.d_model  # tied: a copy of the embedding, plus the final norm
    params = sum(p.numel() * 4 for p in tiny.model.parameters())
    assert sizes.total == params + sizes.embed  # the last stage holds its own copy of the tied matrix
    ranges = resolve_stages(ParallelConfig(stages="auto"), 3, sizes, capacity=int(sizes.total * 0.8))
    assert len(ranges) == 2
    assert isinstance(load_skeleton("tiny-gpt2"), HookedModel)


# ---------------------------------------------------------------------------- backends
def test_one_stage_is_the_local_engine_without_ray():
    import ray

    for parallel in (None, ParallelConfig(stages=1), {"stages": 1, "replicas": 1}):
        backend = build_backend("tiny-llama", parallel)
        assert isinstance(backend, HookedModel)


def test_stage_error_message_and_pickling():
    import pickle

    err = StageError(1, (12, 30), list(range(20)), "InterventionError", "value of shape (3,) does not fit")
    text = str(err)
    assert text.startswith("stage 1 (layers 12..29) on prompts [0, 1, 2, 3, 4, 5, 6, 7, ... (20 prompts)] failed")
    assert "InterventionError: value of shape" in text
    again = pickle.loads(pickle.dumps(err))
    assert (again.stage, again.layers, again.prompt_ids) == (1, (12, 30), list(range(20)))


# ---------------------------------------------------------------------------- micro-batches
def test_row_ranges():
    assert row_ranges(5, 2) == [(0, 3), (3, 5)]
    assert row_ranges(2, 4) == [(0, 1), (1, 2)]


def _interventions(model, batch):
    g = torch.Generator().manual_seed(1)
    b, s = batch.size, batch.seq_len
    source = torch.randn(b, s, model.d_model, generator=g)
    rows = torch.arange(b)
    return [
        patch("resid_pre.1", source, rows=rows, positions=rows % 3, paired=True),  # one patch per row
        zero("z.0", rows=[0, 3], heads=[1, 2], positions=[-1, 0], paired=True),
        steer("resid_pre.2", torch.randn(model.d_model, generator=g), rows=[1, 2]),  # shared value
        Intervention("mlp_out.1", "set", value=torch.randn(b, 1, model.d_model, generator=g), positions=[2]),  # per-row value
        Intervention("attn_out.0", "scale", value=0.5),
    ]


def test_narrowed_interventions_reproduce_the_whole_batch():
    model = load_model("tiny-llama")
    batch = model.tokenize(CLEAN * 2 + ["Mary lives in"])
    items = _interventions(model, batch)
    want = model.run(batch, interventions=items).logits
    for parts in (2, 3, 5):
        pieces = []
        for lo, hi in row_ranges(batch.size, parts):
            sub = narrow_interventions(items, lo, hi, batch.size)
            pieces.append(model.run(slice_batch(batch, lo, hi), interventions=sub).logits)
        torch.testing.assert_close(torch.cat(pieces), want, rtol=1e-5, atol=1e-5)
