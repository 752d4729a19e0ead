"""Fair sharing: one user streaming a 5,000-row sweep does not hold back another user's single ``run``.

Two layers: in this process, with the model thread held by a gate, the order is exact (the other
user's request is the very next batch; the streaming user's requests over the per-user in-flight
limit get 429 naming it); on a real Ray Serve, the other user's ``run`` answers while the sweep still
has requests outstanding. Waits are bounded waits on events and counters, never sleeps.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from interplab.engine import Intervention
from interplab.serve import LimitError

from tests.serve.helpers import BATCH_TOL, BOB, CLEAN, wait_for

SWEEP_ROWS = 5_000
ROWS_PER_REQUEST = 50  # CLEAN x 25
REQUESTS = SWEEP_ROWS // ROWS_PER_REQUEST


def sweep_patch(i: int) -> list[Intervention]:
    """Request ``i`` of the sweep: a different value at resid_pre of layer i % 2, last position."""
    value = torch.randn(64, generator=torch.Generator().manual_seed(i))
    return [Intervention(f"resid_pre.{i % 2}", "set", value=value, positions=[-1])]


def sweep_prompts() -> list[str]:
    return CLEAN * (ROWS_PER_REQUEST // len(CLEAN))


def test_the_other_user_runs_next_and_the_streamer_hits_its_in_flight_limit(make_server, local_tiny):
    """The model thread is held on the first batch; alice fills her in-flight limit, her next request
    gets 429, bob's request is queued behind 3 of hers and still runs in the very next batch."""
    limit = 4
    alice = make_server(limits={"max_user_in_flight": limit}, batching={"window_ms": 0, "max_rows": ROWS_PER_REQUEST})
    bob = alice.as_user(BOB)
    server = alice.server
    gate = threading.Event()
    batches: list[list[str]] = []
    run_batch = server.batcher.execute

    def gated(calls):
        batches.append([c.user for c in calls])
        if len(batches) == 1:
            gate.wait(timeout=120)
        return run_batch(calls)

    server.batcher.execute = gated
    model_a, model_b = alice.model(), bob.model()
    with ThreadPoolExecutor(limit + 1) as pool:
        a_jobs = [pool.submit(model_a.run, sweep_prompts(), logits="last", interventions=sweep_patch(i)) for i in range(limit)]
        wait_for(lambda: len(batches) == 1 and server.batcher.depth == limit - 1, "alice's requests to queue")
        with pytest.raises(LimitError, match="limit max_user_in_flight=4") as refused:
            model_a.run(CLEAN, logits="last")
        assert refused.value.limit == "max_user_in_flight"
        b_job = pool.submit(model_b.run, CLEAN, logits="last", interventions=sweep_patch(7))
        wait_for(lambda: server.batcher.depth == limit, "bob's request to queue")
        gate.set()
        b_out = b_job.result(timeout=120)
        a_out = [job.result(timeout=120) for job in a_jobs]
    assert batches[:2] == [["alice"], ["bob"]] and sorted(u for b in batches for u in b) == ["alice"] * limit + ["bob"]
    want = local_tiny.run(CLEAN, logits="last", interventions=sweep_patch(7))
    torch.testing.assert_close(b_out.logits, want.logits, **BATCH_TOL)
    for i, out in enumerate(a_out):
        want = local_tiny.run(sweep_prompts(), logits="last", interventions=sweep_patch(i))
        torch.testing.assert_close(out.logits, want.logits, **BATCH_TOL)
    assert server.stats()["errors"].get("429") == 1


@pytest.mark.slow
def test_a_single_run_answers_while_another_user_streams_a_5000_row_sweep(served_tiny, local_tiny):
    """alice sends 100 requests of 50 rows from 16 threads; bob's one ``run`` is sent once her first
    answer is back and must be answered while some of her requests are still outstanding."""
    alice, bob = served_tiny.model(), served_tiny.model(BOB)
    lock = threading.Lock()
    answered = [0]
    first_back = threading.Event()
    results: dict[int, torch.Tensor] = {}

    def one(i: int) -> None:
        out = alice.run(sweep_prompts(), logits="last", interventions=sweep_patch(i))
        with lock:
            answered[0] += 1
            results[i] = out.logits
        first_back.set()

    with ThreadPoolExecutor(16) as pool:
        jobs = [pool.submit(one, i) for i in range(REQUESTS)]
        assert first_back.wait(timeout=300), "no answer to the sweep"
        with lock:
            sent_after = answered[0]
        b_out = bob.run(CLEAN, logits="last", interventions=sweep_patch(7))
        with lock:
            answered_by_then = answered[0]
        for job in jobs:
            job.result(timeout=600)
    assert answered_by_then < REQUESTS, (
        f"bob waited for the whole sweep (sent after {sent_after}, answered after {answered_by_then})"
    )
    torch.testing.assert_close(
        b_out.logits, local_tiny.run(CLEAN, logits="last", interventions=sweep_patch(7)).logits, **BATCH_TOL
    )
    assert sorted(results) == list(range(REQUESTS)) and sum(r.shape[0] for r in results.values()) == SWEEP_ROWS
    for i in (0, REQUESTS - 1):
        want = local_tiny.run(sweep_prompts(), logits="last", interventions=sweep_patch(i))
        torch.testing.assert_close(results[i], want.logits, **BATCH_TOL)
