"""Cross-request batching without Ray: merged passes equal each request alone, plans group as they
should, bad requests never join a batch, and the queue takes users in turn (no timing involved)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from interplab.engine import Intervention, InterventionError, patch, steer
from interplab.serve.batching import Batcher, RunCall, check_alone, merge, plan_key, run_together
from interplab.serve.limits import BatchingConfig
from tests.serve.helpers import BATCH_TOL, CLEAN, CORRUPT


def call(model, prompts, *, capture=(), interventions=(), positions=None, logits="all", user="u"):
    return RunCall(model.tokenize(prompts), [model.validate_site(s) for s in capture], list(interventions), positions, logits,
                   user=user)


def assert_same(got, want):
    if want.logits is None:
        assert got.logits is None
    else:
        torch.testing.assert_close(got.logits, want.logits, **BATCH_TOL)
    assert list(got.cache) == list(want.cache)
    for site in want.cache:
        torch.testing.assert_close(got.cache[site], want.cache[site], **BATCH_TOL)
    assert torch.equal(got.cache.positions, want.cache.positions) and torch.equal(got.cache.valid, want.cache.valid)


def direction(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "steer rows": lambda m: [
        call(m, CLEAN, capture=["resid_pre.2"], interventions=[steer("resid_pre.1", direction(0, 64), 3.0, rows=[1])]),
        call(m, ["The city of Paris is in"], capture=["resid_pre.2"], interventions=[steer("resid_pre.1", direction(1, 64), 2.0)]),
        call(m, CORRUPT, capture=["resid_pre.2"]),
    ],
    "paired patches": lambda m: [
        call(m, CORRUPT, interventions=[patch("resid_pre.1", m.run(CLEAN, capture=["resid_pre.1"]).cache["resid_pre.1"],
                                              rows=[0, 1], positions=[2, -1], paired=True)], logits="last"),
        call(m, ["Mary lives in"], interventions=[Intervention("resid_pre.1", "set", value=direction(2, 64), positions=[-1])],
             logits="last"),
    ],
    "full-width values": lambda m: [  # positions=None selects each request's own [b, s, d], not the merged width
        call(m, ["Mary lives in"], interventions=[Intervention("mlp_out.0", "add", value=direction(3, 1, 3, 64))]),
        call(m, CLEAN, interventions=[Intervention("mlp_out.0", "scale", value=0.5)]),
    ],
    "heads and positions": lambda m: [
        call(m, CLEAN, capture=["z.1", "pattern.1"], positions=[-1, 0],
             interventions=[Intervention("z.1", "set", value=0.0, rows=[0, 1], heads=[1, 3], positions=[-1, -2], paired=True)]),
        call(m, ["Mary lives in"], capture=["z.1", "pattern.1"], positions=[-1, 0],
             interventions=[Intervention("z.1", "scale", value=2.0, heads=[2], rows=[0], positions=[0], paired=True)]),
    ],
    "per-row positions": lambda m: [
        call(m, CLEAN, capture=["resid_post.2"], positions=torch.tensor([[0, 3], [1, 2]])),
        call(m, ["Mary lives in"], capture=["resid_post.2"], positions=torch.tensor([[2, 0]])),
    ],
    "captures only": lambda m: [
        call(m, CLEAN, capture=["resid_pre.0", "mlp_post.1"], logits="none"),
        call(m, ["Mary lives in", "The city of Paris is in"], capture=["resid_pre.0", "mlp_post.1"], logits="none"),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_pass_equals_each_request_alone(local_tiny, case):
    calls = CASES[case](local_tiny)
    assert len({plan_key(c) for c in calls}) == 1, "the case's requests should share a plan"
    merged, spans = merge(calls, pad_id=1)
    assert merged.batch.size == sum(c.batch.size for c in calls) and len(spans) == len(calls)
    for c, got in zip(calls, run_together(local_tiny, calls, pad_id=1)):
        assert_same(got, c.run_alone(local_tiny))


def test_plans_that_compute_differently_do_not_share_a_pass(local_tiny):
    m = local_tiny
    base = call(m, CLEAN, capture=["resid_pre.1"])
    others = {
        "other captures": call(m, CLEAN, capture=["resid_pre.2"]),
        "other logits": call(m, CLEAN, capture=["resid_pre.1"], logits="last"),
        "other positions": call(m, CLEAN, capture=["resid_pre.1"], positions=[-1]),
        "attention intervened": call(m, CLEAN, capture=["resid_pre.1"], interventions=[Intervention("z.1", "set", value=0.0)]),
        "head_out intervened": call(m, CLEAN, capture=["resid_pre.1"], interventions=[Intervention("head_out.1", "set", value=0.0)]),
    }
    for name, other in others.items():
        assert plan_key(other) != plan_key(base), name
    steered = call(m, CLEAN, capture=["resid_pre.1"], interventions=[steer("resid_pre.2", direction(4, 64))])
    assert plan_key(steered) == plan_key(base)  # a residual-stream patch leaves other rows' computation alone
    keep = call(m, CLEAN)
    keep.keep_kv = True
    assert plan_key(keep) is None


def test_a_bad_request_fails_alone_with_the_local_error(local_tiny):
    m = local_tiny
    dims = {"n_heads": m.n_heads, "d_model": m.d_model, "d_head": m.head_dim, "d_mlp": m.d_mlp, "vocab": m.d_vocab}
    bad = call(m, ["Mary lives in"], interventions=[Intervention("resid_pre.1", "set", value=direction(5, 64), rows=[1])])
    with pytest.raises(InterventionError, match=r"interventions\[0\].*rows \[1\] out of range for batch of 1"):
        check_alone(bad, dims)
    # rows 1 would be the next request's row in a merged batch: checked alone first, it never gets there
    with pytest.raises(InterventionError):
        bad.run_alone(m)
    good = call(m, CLEAN)
    outcomes = run_together(m, [good, bad], pad_id=1)  # should the merged pass fail, each runs alone
    assert isinstance(outcomes[1], InterventionError)
    assert_same(outcomes[0], good.run_alone(m))


def test_the_queue_takes_users_in_turn(local_tiny):
    """While one forward runs, user a queues five requests and user b one: b's is in the very next batch."""
    m = local_tiny
    release = threading.Event()
    batches: list[list[str]] = []

    def execute(calls):
        batches.append([c.user + c.batch.texts[0][-2:] for c in calls])
        if len(batches) == 1:
            release.wait(timeout=60)
        return [None] * len(calls)

    async def scenario():
        batcher = Batcher(BatchingConfig(window_ms=0, max_requests=2), execute, ThreadPoolExecutor(1))
        first = call(m, ["Mary lives in"], user="a")
        first.keep_kv = True  # runs alone, at once
        tasks = [asyncio.create_task(batcher.submit(first))]
        while not batches:
            await asyncio.sleep(0)
        for i in range(5):
            tasks.append(asyncio.create_task(batcher.submit(call(m, [f"Mary lives in {i}"], user="a"))))
        tasks.append(asyncio.create_task(batcher.submit(call(m, ["Mary lives in 9"], user="b"))))
        while batcher.depth < 6:
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        await batcher.aclose()
        return batcher.stats

    stats = asyncio.run(scenario())
    assert batches[1] == ["b 9", "a 0"]  # b's turn: b's request seeds the batch, a's fills it
    assert [len(b) for b in batches] == [1, 2, 2, 2]
    assert stats.per_user == {"a": 6, "b": 1} and stats.sizes == {1: 1, 2: 3}


# --------------------------------------------------------------------------- shared prompts
def _patches(m, prompts, layers_positions, *, kind="resid_pre", logits="last"):
    """One request per (layer, position): the clean run's ``kind`` there, patched into ``prompts``."""
    sites = [f"{kind}.{layer}" for layer, _ in layers_positions]
    clean = m.run(CLEAN[: len(prompts)], capture=sorted(set(sites)), logits="none").cache
    return [
        call(m, prompts, interventions=[patch(site, clean[site], positions=[pos])], logits=logits, user=f"u{i % 3}")
        for i, (site, (_, pos)) in enumerate(zip(sites, layers_positions))
    ]


SHARED = {
    "resid_pre sweep": lambda m: _patches(m, CORRUPT[:1], [(layer, pos) for layer in (0, 1, 2) for pos in (0, 5, 9, 12)]),
    "two prompts, two rows each": lambda m: _patches(m, CORRUPT, [(1, 3), (1, 7), (2, 0), (2, 11), (0, -1)]),
    "attn_out and mlp_out": lambda m: [
        *_patches(m, CORRUPT[:1], [(1, 4), (1, 6), (2, 8), (2, 9)], kind="attn_out"),
        *_patches(m, CORRUPT[:1], [(0, 12), (1, 10), (2, 10)], kind="mlp_out"),
    ],
    "all logits": lambda m: _patches(m, CORRUPT[:1], [(2, 4), (2, 6), (1, 1), (2, 0), (2, 9)], logits="all"),
    "mixed with unshared": lambda m: [
        *_patches(m, CORRUPT[:1], [(2, 5), (2, 6), (2, 7), (1, 9)]),
        call(
            m,
            ["The city of Paris is in"],
            interventions=[steer("resid_post.1", direction(7, 64), 2.0, positions=[-2, 1])],
            logits="last",
        ),
        call(m, CORRUPT, interventions=[Intervention("mlp_post.2", "scale", value=0.0, rows=[1], positions=[4])], logits="last"),
        call(m, CORRUPT[:1], logits="last"),  # no interventions: the base run itself
        call(
            m,
            CORRUPT[:1],
            interventions=[
                Intervention("resid_pre.1", "add", value=direction(8, 2, 64), rows=[0], positions=torch.tensor([3, 8]))
            ],
            logits="last",
        ),
    ],
}


def _spy(monkeypatch, m):
    """Record every pass the shared path makes on ``m``: ``("stage", batch, kwargs)`` for run_stage,
    ``("packed", batch, forks)`` for a packed pass."""
    from interplab.serve import sharing

    seen = []
    real_stage, real_packed = m.run_stage, sharing.run_packed

    def run_stage(batch, **kw):
        seen.append(("stage", batch, kw))
        return real_stage(batch, **kw)

    def run_packed(model, batch, forks, interventions=()):
        seen.append(("packed", batch, list(forks)))
        return real_packed(model, batch, forks, interventions)

    monkeypatch.setattr(m, "run_stage", run_stage, raising=False)
    monkeypatch.setattr(sharing, "run_packed", run_packed)
    return seen


@pytest.mark.parametrize("case", list(SHARED))
def test_requests_sharing_a_prompt_compute_it_once_and_equal_each_alone(local_tiny, case, monkeypatch):
    """Rows that share a prompt fork from one base row at their first patched layer (and, packed, their
    first patched position: interplab.serve.sharing); each request still gets exactly its own run's logits."""
    from interplab.engine.plan import Fork
    from interplab.serve.sharing import shared_pass

    m = local_tiny
    calls = SHARED[case](m)
    assert len({plan_key(c) for c in calls}) == 1
    seen = _spy(monkeypatch, m)
    merged, _ = merge(calls, pad_id=1)
    assert shared_pass(m, merged) is not None, "the shared path should apply"
    ((how, batch, detail),) = seen  # one pass
    if merged.logits == "last":  # set/add/scale with last-position logits: packed
        assert how == "packed" and detail
        forked, starting = len(detail), batch.size
    else:
        assert how == "stage" and detail["joins"]
        assert all(isinstance(f, Fork) and f.size for f in detail["joins"].values())
        forked = sum(f.size for f in detail["joins"].values())
        starting = batch.size - forked
    extra = starting - (merged.batch.size - forked)  # base rows that are no request's row
    assert 0 <= extra <= len(set(merged.batch.texts)) and starting < merged.batch.size  # fewer rows start at the embedding
    seen.clear()
    for c, got in zip(calls, run_together(m, calls, pad_id=1)):
        assert_same(got, c.run_alone(m))


def test_forked_rows_join_at_their_first_patched_layer_and_position(local_tiny, monkeypatch):
    from interplab.engine.packed import PackedFork
    from interplab.serve.sharing import shared_pass

    m = local_tiny
    calls = _patches(m, CORRUPT[:1], [(2, 9), (2, 10), (2, -1), (1, 12)])
    calls.append(call(m, CORRUPT[:1], logits="last"))  # unpatched: it is the base row itself
    last = int(calls[0].batch.lengths[0]) - 1
    seen = _spy(monkeypatch, m)
    result = shared_pass(m, merge(calls, pad_id=1)[0])
    ((how, batch, forks),) = seen
    assert how == "packed" and batch.size == 1  # no extra row: the unpatched request is the base
    assert forks == [PackedFork(0, 1, 12), PackedFork(0, 2, 9), PackedFork(0, 2, 10), PackedFork(0, 2, last)]
    for i, c in enumerate(calls):
        torch.testing.assert_close(result.logits[i : i + 1], c.run_alone(m).logits, **BATCH_TOL)
    seen.clear()
    whole = [call(m, CORRUPT[:1], interventions=c.interventions, logits="all") for c in calls[:4]]
    shared_pass(m, merge(whole, pad_id=1)[0])  # all logits: whole rows fork (run_stage Fork joins)
    ((how, batch, kw),) = seen
    assert how == "stage" and batch.size == 5 and kw["start"] == 0  # one extra base row
    assert {layer: f.rows.tolist() for layer, f in kw["joins"].items()} == {1: [0], 2: [0, 0, 0]}


def test_a_fork_copies_the_rows_it_names(local_tiny):
    """Engine level: a Fork at layer L equals joining the same rows' resid_pre there as tensors."""
    from interplab.engine.plan import Fork

    m = local_tiny
    batch = m.tokenize([*CLEAN, CLEAN[1], CLEAN[0]])
    pre = m.run(m.tokenize(CLEAN), capture=["resid_pre.2"], logits="none").cache["resid_pre.2"]
    value = direction(11, 64)
    items = [steer("resid_pre.2", value, rows=[2], positions=[4]), steer("resid_post.2", value, rows=[3])]
    forked, _ = m.run_stage(
        batch, start=0, stop=m.n_layers, with_head=True, interventions=items, logits="last", joins={2: Fork(torch.tensor([1, 0]))}
    )
    want = m.run(batch, interventions=items, logits="last").logits
    torch.testing.assert_close(forked, want, **BATCH_TOL)
    joined, _ = m.run_stage(
        batch.select([2, 3]),
        start=2,
        stop=m.n_layers,
        with_head=True,
        logits="last",
        interventions=[steer("resid_pre.2", value, rows=[0], positions=[4]), steer("resid_post.2", value, rows=[1])],
        joins={2: pre[[1, 0]]},
    )
    torch.testing.assert_close(forked[2:], joined, **BATCH_TOL)
    with pytest.raises(ValueError, match=r"fork at layer 2 copies rows \[1, 5\], but rows 0..1 are there"):
        m.run_stage(batch, start=0, stop=m.n_layers, with_head=True, joins={2: Fork(torch.tensor([1, 5]))})


def test_captures_unshared_prompts_and_low_layers_take_the_plain_merged_pass(local_tiny):
    from interplab.serve.sharing import shared_pass

    m = local_tiny
    captured = [
        call(m, CORRUPT[:1], capture=["resid_pre.1"], interventions=[steer("resid_pre.2", direction(9, 64))], logits="last")
    ] * 3
    unshared = [call(m, [p], interventions=[steer("resid_pre.2", direction(9, 64))], logits="last") for p in CLEAN]
    attention = [call(m, CORRUPT[:1], interventions=[Intervention("z.1", "set", value=0.0)], logits="last")] * 3
    # forked, these rows would skip 16 token-layers (layer 1 x 13 tokens, 1 position x 3 layers); the base row costs 39
    at_layer_0 = _patches(m, CORRUPT[:1], [(0, 0), (0, 1), (1, 0)])
    for calls in (captured, unshared, attention, at_layer_0):
        assert shared_pass(m, merge(calls, pad_id=1)[0]) is None


def test_the_next_batch_waits_for_the_requests_the_last_pass_answered(local_tiny):
    """Regrouping (no clocks involved: the deadline is computed from set times). After a pass of 16
    requests that took 0.2 s, a batch seeded while fewer than 16 are queued may wait until the
    model has been free for regroup x 0.2 s (capped by regroup_max_ms); with all 16 back, only the
    window applies."""
    from interplab.serve.batching import _Item

    loop = asyncio.new_event_loop()
    try:
        for regroup, cap_ms, wait in [(1.0, 250.0, 0.2), (0.5, 250.0, 0.1), (1.0, 150.0, 0.15), (0.0, 250.0, 0.005)]:
            batcher = Batcher(BatchingConfig(window_ms=5, regroup=regroup, regroup_max_ms=cap_ms), lambda calls: [], ThreadPoolExecutor(1))
            batcher._free_since, batcher._last_pass_s, batcher._expected = 100.0, 0.2, 16
            items = [_Item(call(local_tiny, ["Mary lives in"]), "k", loop.create_future(), arrived=100.001) for _ in range(16)]
            batcher.queues["u"] = items[:3]
            assert batcher._deadline(items[0]) == pytest.approx(100.0 + max(wait, 0.005 + 0.001)), (regroup, cap_ms)
            batcher.queues["u"] = items
            assert batcher._deadline(items[0]) == pytest.approx(100.006)  # everyone is back: the window only
    finally:
        loop.close()
