"""The service on a real Ray Serve on localhost, reached over HTTP by the client a notebook uses."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from interplab.engine import Intervention
from interplab.serve import AuthError, LimitError, UnknownModelError, connect
from interplab.serve.wire import CONTENT_TYPE, Frame
from tests.serve import checks
from tests.serve.helpers import ALICE, BATCH_TOL, BOB, CLEAN, malformed_requests, wait_for


def post(served, op, body, token=ALICE, headers=None):
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = httpx.post(f"{served.url}/{served.name}/{op}", content=body,
                          headers={**auth, "Content-Type": CONTENT_TYPE, **(headers or {})}, timeout=120)
    return response.status_code, response.json() if response.headers.get("content-type", "").startswith("application/json") else None


def test_remote_equals_local(remote_tiny, local_tiny):
    checks.check_shape_tokens_and_sites(remote_tiny, local_tiny)
    checks.check_runs(remote_tiny, local_tiny)
    checks.check_gradients(remote_tiny, local_tiny)
    checks.check_generate(remote_tiny, local_tiny)
    checks.check_stage_passes(remote_tiny, local_tiny)


def test_errors_keep_their_class_and_refusals(remote_tiny, local_tiny):
    checks.check_errors_keep_their_class(remote_tiny, local_tiny)
    checks.check_refusals(remote_tiny)


def test_malformed_requests_then_a_good_one(served_tiny, remote_tiny, local_tiny):
    checks.check_malformed_then_good(lambda op, body: post(served_tiny, op, body), remote_tiny, local_tiny,
                                     malformed_requests(served_tiny.name))


def test_tokens_are_required(served_tiny):
    body = Frame().encode({"model": served_tiny.name})
    for token in (None, "not-a-token-of-anyone-at-all", ALICE + "x"):
        status, payload = post(served_tiny, "info", body, token=token)
        assert status == 401 and payload["error"]["type"] == "AuthError", token
    status, _ = post(served_tiny, "info", body, token=None, headers={"Authorization": f"Basic {ALICE}"})
    assert status == 401
    with pytest.raises(AuthError):
        served_tiny.model(token="wrong-token-0123456789")
    assert served_tiny.model(token=BOB).user == "bob" and served_tiny.model().user == "alice"


def test_unknown_model_names_what_is_served(served_tiny):
    with connect(served_tiny.url, token=ALICE) as session:
        with pytest.raises(UnknownModelError, match=f"no model named 'gpt-17'.*served: .*{served_tiny.name}"):
            session.model("gpt-17")
        assert served_tiny.name in session.models()


def test_body_over_the_limit_is_refused_before_it_is_read(served_tiny):
    """A request declaring a body over max_request_bytes gets 413 without sending it (raw HTTP: a
    client library would refuse to send a body shorter than its Content-Length)."""
    import json
    import socket
    from urllib.parse import urlparse

    from interplab.serve.limits import ServeLimits

    url = urlparse(served_tiny.url)
    request = (f"POST /{served_tiny.name}/run HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {ALICE}\r\n"
               f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {ServeLimits().max_request_bytes + 1}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(request + b"x" * 16)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])["error"]["limit"] == "max_request_bytes"


@pytest.mark.slow
def test_limits_over_http(serve_app, local_tiny):
    served = serve_app("tiny-limits", limits={"max_rows": 2, "max_new_tokens": 2, "max_tensor_bytes": 1024})
    remote = served.model()
    for limit, case in {
        "max_rows": lambda: remote.run(CLEAN + CLEAN[:1]),
        "max_new_tokens": lambda: remote.generate("Mary", 3),
        "max_tensor_bytes": lambda: remote.run(CLEAN, interventions=[Intervention("resid_pre.1", "set", value=torch.ones(5, 64))]),
    }.items():
        with pytest.raises(LimitError, match=f"limit {limit}=") as info:
            case()
            pytest.fail(f"{limit}: not refused")
        assert info.value.limit == limit
    torch.testing.assert_close(remote.run(CLEAN, logits="last").logits, local_tiny.run(CLEAN, logits="last").logits,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_clients_patching_the_same_site_at_once_each_get_their_own(serve_app, local_tiny):
    """Two users, released together by a barrier, patch resid_pre.1 with different values. The
    deployment waits for both (max_requests=2, a window far longer than the test): one merged pass."""
    from interplab.serve.deployment import stats

    served = serve_app("tiny-pair", batching={"window_ms": 120_000, "max_requests": 2})
    clients = [served.model(ALICE), served.model(BOB)]
    values = [torch.full((64,), 3.0), torch.full((64,), -2.0)]
    prompts = [CLEAN, ["The city of Paris is in"]]
    barrier = threading.Barrier(2)
    got: dict[int, object] = {}
    failed: list[BaseException] = []

    def patched(i):
        return [Intervention("resid_pre.1", "set", value=values[i], positions=[-1])]

    def work(i):
        try:
            barrier.wait(timeout=60)
            got[i] = clients[i].run(prompts[i], capture=["resid_pre.2"], logits="last", interventions=patched(i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failed and sorted(got) == [0, 1]
    counters = stats("tiny-pair")["batching"]
    assert counters["batch_sizes"] == {"2": 1} and counters["per_user"] == {"alice": 1, "bob": 1}
    for i in range(2):
        want = local_tiny.run(prompts[i], capture=["resid_pre.2"], logits="last", interventions=patched(i))
        torch.testing.assert_close(got[i].logits, want.logits, **BATCH_TOL)
        torch.testing.assert_close(got[i].cache["resid_pre.2"], want.cache["resid_pre.2"], **BATCH_TOL)
        other = local_tiny.run(prompts[i], logits="last", interventions=[Intervention("resid_pre.1", "set", value=values[1 - i],
                                                                                       positions=[-1])])
        assert not torch.allclose(got[i].logits, other.logits, **BATCH_TOL)  # not the other user's patch


@pytest.mark.slow
def test_a_pipeline_served_model_equals_local(serve_app, local_tiny):
    served = serve_app("tiny-pipe", parallel={"stages": 2, "micro_batches": 2})
    remote = served.model()
    assert len(remote.stage_ranges) == 2 and remote.stage_ranges[0][0] == 0 and remote.stage_ranges[-1][1] == local_tiny.n_layers
    checks.check_runs(remote, local_tiny)
    checks.check_gradients(remote, local_tiny)
    checks.check_stage_passes(remote, local_tiny)


@pytest.mark.slow
def test_cli_serve_list_status_stop(serve_cluster, tmp_path):
    from click.testing import CliRunner

    from interplab.cli.serve_cmds import serve
    from interplab.serve.deployment import proxy_url

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{ALICE} alice\n")
    runner = CliRunner()
    result = runner.invoke(serve, ["tiny-llama", "--name", "cli-tiny", "--tokens", str(tokens), "--num-cpus", "0.2"])
    assert result.exit_code == 0, result.output
    assert f"serving tiny-llama at {proxy_url()}/cli-tiny" in result.output
    result = runner.invoke(serve, ["list"])
    assert result.exit_code == 0 and "cli-tiny\tRUNNING\t1 running" in result.output, result.output
    connect(proxy_url(), token=ALICE).model("cli-tiny").run(CLEAN, logits="last")
    result = runner.invoke(serve, ["status", "cli-tiny"])
    assert result.exit_code == 0 and "queue 0" in result.output and "'alice': 1" in result.output, result.output
    assert "stages [[0, 3]]" in result.output and "batches 1 (sizes {'1': 1})" in result.output, result.output

    def ray_metrics():  # Ray exports Serve's metrics every few seconds: wait for info + run to show
        report = json.loads(runner.invoke(serve, ["status", "cli-tiny", "--json"]).output)["cli-tiny"]
        metrics = report.get("serve_metrics", {})
        healthy = any(r["healthy"] for r in metrics.get("replicas", {}).values())
        return report if metrics.get("requests", 0) >= 2 and healthy else None

    wait_for(ray_metrics, "Ray Serve's request counter of cli-tiny", timeout_s=90, poll_s=1.0)
    metrics = ray_metrics()["serve_metrics"]
    assert metrics["requests"] == 2 and metrics["replica_starts"] >= 1 and metrics["nodes_read"] >= 1
    (replica,) = [r for r in metrics["replicas"].values() if r["healthy"]]
    assert replica["requests"] == 2 and replica["mean_latency_ms"] > 0
    result = runner.invoke(serve, ["status", "cli-tiny"])
    assert "ray serve: requests 2" in result.output and "healthy  requests 2" in result.output, result.output
    assert runner.invoke(serve, ["stop", "cli-tiny"]).exit_code == 0
    assert "cli-tiny" not in runner.invoke(serve, ["list"]).output
    result = runner.invoke(serve, ["stop", "cli-tiny"])
    assert result.exit_code == 2 and "no served model named 'cli-tiny'" in result.output
    result = runner.invoke(serve, ["tiny-llama", "--tokens", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_status_sums_the_counters_of_every_replica(serve_app):
    """Two replicas: the per-user and batch counters in ``serve_metrics`` are the totals over both."""
    from interplab.serve.status import serve_metrics

    served_two = serve_app("tiny-two", replicas=2, batching={"enabled": False})
    sent = {"alice": 6, "bob": 4}
    for user, token in (("alice", ALICE), ("bob", BOB)):
        model = served_two.model(token)
        for i in range(sent[user]):
            model.run(CLEAN[i % 2], logits="last")

    def summed():  # Ray exports metrics every few seconds, each replica on its own schedule
        metrics = serve_metrics("tiny-two")
        healthy = [r for r in metrics["replicas"].values() if r["healthy"]]
        done = metrics["per_user"] == sent and metrics["operations"].get("run") == 10 and len(healthy) == 2
        return metrics if done and sum(int(k) * n for k, n in metrics["batch_sizes"].items()) == 10 else None

    wait_for(summed, "the replicas' counters in Ray's metrics", timeout_s=180, poll_s=1.0)
    metrics = summed() or serve_metrics("tiny-two")
    assert metrics["batch_sizes"] == {"1": 10} and metrics["queue_depth"] == 0, metrics
