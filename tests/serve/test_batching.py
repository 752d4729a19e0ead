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
