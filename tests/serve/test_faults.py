"""Faults: a replica killed mid-request (``ray.kill`` of its actor). The request fails with a clear
503 (no retries) or is retried and answered (retries); Ray Serve starts a new replica, and the next
requests succeed with the right numbers. A stage actor of a pipeline-served model killed (SIGKILL)
mid-request: the pipeline resubmits to the restarted stage and the requests are answered.

The deployment's batching window is longer than the test and a batch is two requests, so a lone
request is certainly inside the replica (queued) when the replica is killed, and two requests sent
together run at once: no timing is involved.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray
import torch
from interplab.engine import Intervention
from interplab.serve import ServiceUnavailable, connect
from interplab.serve.deployment import replica_actors, served, stats

from tests.serve.helpers import ALICE, BATCH_TOL, CLEAN, wait_for

NAME = "tiny-faults"


def patched(value: float) -> list[Intervention]:
    return [Intervention("resid_pre.1", "set", value=torch.full((64,), value), positions=[-1])]


def kill_replica_mid_request(send) -> tuple[str, dict]:
    """Start ``send()`` in a thread, wait until its request is queued in the replica, kill the
    replica's actor; returns the killed actor's name and what ``send`` returned or raised."""
    (replica,) = replica_actors(NAME)
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = send()
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    wait_for(lambda: stats(NAME)["queue_depth"] == 1, "the request to be queued in the replica", poll_s=0.05)
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    return replica, {"thread": thread, "outcome": outcome}


def replaced(old: str) -> bool:
    info = served().get(NAME, {})
    alive = replica_actors(NAME)
    return info.get("status") == "RUNNING" and len(alive) == 1 and alive[0] != old


@pytest.mark.slow
def test_a_replica_killed_mid_request(serve_app, local_tiny):
    served_model = serve_app(NAME, batching={"window_ms": 600_000, "max_requests": 2})
    fragile = connect(served_model.url, token=ALICE, retries=0).model(NAME)
    sturdy = connect(served_model.url, token=ALICE, retries=5).model(NAME)

    # no retries: a clear 503
    old, pending = kill_replica_mid_request(lambda: fragile.run(CLEAN, logits="last"))
    pending["thread"].join(timeout=120)
    error = pending["outcome"].get("error")
    assert isinstance(error, ServiceUnavailable) and error.status == 503, pending["outcome"]
    assert "replica failed mid-request or is restarting" in str(error) and "HTTP 5" in str(error)
    wait_for(lambda: replaced(old), "Ray Serve to start a new replica", timeout_s=180, poll_s=0.2)

    # retries: the killed request is sent again and answered by the new replica, with a second one
    old, pending = kill_replica_mid_request(lambda: sturdy.run(CLEAN, logits="last", interventions=patched(3.0)))
    other = sturdy.run(["The city of Paris is in"], logits="last", interventions=patched(-2.0))
    pending["thread"].join(timeout=300)
    assert "error" not in pending["outcome"], pending["outcome"]
    first = pending["outcome"]["result"]
    torch.testing.assert_close(first.logits, local_tiny.run(CLEAN, logits="last", interventions=patched(3.0)).logits, **BATCH_TOL)
    want = local_tiny.run(["The city of Paris is in"], logits="last", interventions=patched(-2.0))
    torch.testing.assert_close(other.logits, want.logits, **BATCH_TOL)
    assert replaced(old)


@pytest.mark.slow
def test_a_stage_actor_killed_mid_request(serve_app, local_tiny):
    name = "tiny-pipe-faults"
    served_model = serve_app(name, parallel={"stages": 2, "max_retries": 5},
                                 batching={"window_ms": 600_000, "max_requests": 2})
    model = connect(served_model.url, token=ALICE, retries=0).model(name)
    before = stats(name)["stage_pids"]
    assert len(before) == 2 and os.getpid() not in before
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = model.run(CLEAN, logits="last", interventions=patched(3.0))
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    wait_for(lambda: stats(name)["queue_depth"] == 1, "the request to be queued in the replica", poll_s=0.05)
    os.kill(before[1], signal.SIGKILL)  # the last stage dies while the request waits for its batch
    other = model.run(["The city of Paris is in"], logits="last", interventions=patched(-2.0))  # completes the batch
    thread.join(timeout=300)
    assert "error" not in outcome, outcome
    want = local_tiny.run(CLEAN, logits="last", interventions=patched(3.0))
    torch.testing.assert_close(outcome["result"].logits, want.logits, **BATCH_TOL)
    want = local_tiny.run(["The city of Paris is in"], logits="last", interventions=patched(-2.0))
    torch.testing.assert_close(other.logits, want.logits, **BATCH_TOL)
    after = stats(name)["stage_pids"]
    assert after[0] == before[0] and after[1] != before[1], (before, after)
