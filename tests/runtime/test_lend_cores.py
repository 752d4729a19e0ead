"""CPU stages lend their threads to a busy stage during a pipeline's fill and drain."""

from __future__ import annotations

import itertools

import pytest
import torch

from interplab import load_model
from interplab.runtime.microbatch import lent_threads
from tests.runtime.helpers import CLEAN


def test_first_micro_batch_borrows_downstream_threads_and_last_borrows_upstream():
    assert lent_threads([1, 1], 0, 4) == [2, 1]
    assert lent_threads([1, 1], 1, 4) == [1, 1]
    assert lent_threads([1, 1], 3, 4) == [1, 2]
    assert lent_threads([2, 1, 3], 0, 1) == [6, 6, 6]  # one micro-batch: each stage runs alone
    assert lent_threads([2, 1, 3], 0, 5) == [6, 4, 3]
    assert lent_threads([2, 1, 3], 4, 5) == [2, 3, 6]


@pytest.mark.parametrize("threads", [[1, 1], [1, 2, 1], [2, 1, 1, 3]], ids=["2", "3", "4"])
@pytest.mark.parametrize("n_mbs", [1, 2, 3, 6])
def test_lent_threads_never_oversubscribe_the_node(threads, n_mbs):
    """Stages take micro-batches in order, so stages busy at one moment hold strictly decreasing
    micro-batch indices from the first stage to the last; every such moment fits the node's cores."""
    total = sum(threads)
    idle = None
    for state in itertools.product([idle, *range(n_mbs)], repeat=len(threads)):
        busy = [(s, mb) for s, mb in enumerate(state) if mb is not None]
        if any(a[1] <= b[1] for a, b in zip(busy, busy[1:])):
            continue  # not a reachable moment: a later stage cannot be at the same or a later micro-batch
        used = sum(lent_threads(threads, mb, n_mbs)[s] for s, mb in busy)
        assert used <= total, f"stages at micro-batches {state} would use {used} threads of {total}"


@pytest.mark.slow
def test_pipeline_lends_threads_on_one_node_with_the_same_results(pipelines):
    pipe = pipelines.get("tiny-llama", stages=2, micro_batches=3)
    assert pipe.scheduler.replica_handles[0].one_node  # the local test cluster has one node
    batch = pipe.tokenize(CLEAN * 3)

    def threads_of_each_micro_batch():
        scheduler = pipe.scheduler
        return [[t.threads for t in scheduler.lend_cores(scheduler.chain_tasks(
            0, mb, batch, 2 * mb, 2 * mb + 2, mode="run", capture=[], interventions=[], positions=None, logits="all",
        ), mb, 3)] for mb in range(3)]

    assert threads_of_each_micro_batch() == [[2, None], [None, None], [None, 2]]  # stages own 1 thread each
    lent = pipe.run(CLEAN * 3, capture=["resid_post.1"])
    pipe.scheduler.parallel = pipe.parallel.model_copy(update={"lend_cores": False})
    try:
        assert threads_of_each_micro_batch() == [[None, None]] * 3
        plain = pipe.run(CLEAN * 3, capture=["resid_post.1"])
    finally:
        pipe.scheduler.parallel = pipe.parallel.model_copy(update={"lend_cores": True})
    want = load_model("tiny-llama").run(CLEAN * 3, capture=["resid_post.1"])
    for got in (lent, plain):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cache["resid_post.1"], want.cache["resid_post.1"], rtol=1e-5, atol=1e-5)
