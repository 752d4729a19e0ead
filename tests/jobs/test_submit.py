"""Submission through Ray's Jobs API to a real head (``ray start --head`` on loopback, token auth):
submit, status, logs, list, stop; the submitted job writes to the shared store."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import interplab, rows


def cli(ray_head, *args: str):
    return interplab(*args, env={**ray_head["env"], "RAY_API_SERVER_ADDRESS": ray_head["address"]}, timeout=120)


def wait_for(ray_head, submission_id: str, states: set[str], timeout: float = 180) -> str:
    deadline = time.time() + timeout
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in states:
            return status
        time.sleep(1.0)
    raise AssertionError(f"{submission_id} did not reach {states}; logs:\n{client.get_job_logs(submission_id)[-3000:]}")


@pytest.mark.slow
def test_submit_status_logs_list(ray_head, tmp_path):
    spec = tmp_path / "prompts.jsonl"
    spec.write_text('{"prompt": "When Mary and John went to the store"}\n{"prompt": "John gave a drink to"}\n'
                    '{"prompt": "The Eiffel Tower is in"}\n')
    (tmp_path / "spec.yaml").write_text(
        "kind: capture\nmodel: tiny-llama\ndataset: {path: prompts.jsonl}\nsites: [resid_post.1, z.2]\n"
        "positions: [-1]\nbatch_size: 2\nresources: {num_cpus: 0.5}\n")
    store = tmp_path / "shared-store"
    out = cli(ray_head, "submit", str(tmp_path / "spec.yaml"), "--store", str(store))
    assert out.returncode == 0, out.stdout + out.stderr
    submission_id = out.stdout.split("submitted ", 1)[1].split()[0]
    run_id = out.stdout.split("run_id: ", 1)[1].split()[0]
    assert submission_id == f"interplab-{run_id}"
    assert wait_for(ray_head, submission_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"

    status = cli(ray_head, "jobs", "status", run_id, "--json")  # a run id works as well as the submission id
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["interplab_run_id"] == run_id

    logs = cli(ray_head, "jobs", "logs", submission_id)
    assert logs.returncode == 0 and f"committed run {run_id}" in logs.stdout, logs.stdout + logs.stderr

    listed = cli(ray_head, "jobs", "list")
    assert listed.returncode == 0 and submission_id in listed.stdout and "SUCCEEDED" in listed.stdout

    got = rows(str(store), f"SELECT site, count(*) AS n FROM activations WHERE run_id = '{run_id}' GROUP BY site ORDER BY site")
    assert got == [{"site": "resid_post", "n": 3}, {"site": "z", "n": 3 * 4}]
    # the run keeps the spec it ran (dataset copied along with it), so it can be re-run
    spec_saved = json.loads(rows(str(store), f"SELECT spec FROM runs WHERE run_id = '{run_id}'")[0]["spec"])
    assert spec_saved["sites"] == ["resid_post.1", "z.2"]

    # resubmitting the same run id resumes it: here already committed, so nothing is recomputed
    again = cli(ray_head, "submit", str(tmp_path / "spec.yaml"), "--store", str(store), "--run-id", run_id)
    assert again.returncode == 0, again.stdout + again.stderr
    second = again.stdout.split("submitted ", 1)[1].split()[0]
    assert second == f"interplab-{run_id}-2"
    assert wait_for(ray_head, second, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    logs = cli(ray_head, "jobs", "logs", run_id)  # the run id finds its latest submission
    assert "already committed; nothing to do" in logs.stdout, logs.stdout + logs.stderr


@pytest.mark.slow
def test_stop_marks_the_run_failed(ray_head, tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "kind: capture\nmodel: smollm2-135m\ndataset: {builtin: ioi}\nsites: [resid_post.0, resid_post.10, resid_post.20]\n"
        "batch_size: 1\nresources: {num_cpus: 0.5}\n")
    store = tmp_path / "store"
    out = cli(ray_head, "submit", str(tmp_path / "spec.yaml"), "--store", str(store))
    assert out.returncode == 0, out.stdout + out.stderr
    submission_id = out.stdout.split("submitted ", 1)[1].split()[0]
    run_id = out.stdout.split("run_id: ", 1)[1].split()[0]
    deadline = time.time() + 120
    while not list((store / "chunks" / run_id / "job_chunks").glob("*.json")):
        assert time.time() < deadline, "the job never started computing"
        time.sleep(0.5)
    stop = cli(ray_head, "jobs", "stop", submission_id)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    assert wait_for(ray_head, submission_id, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    deadline = time.time() + 30
    while rows(str(store), f"SELECT status FROM runs WHERE run_id = '{run_id}'") != [{"status": "failed"}]:
        assert time.time() < deadline, "a stopped job's run must be marked failed"
        time.sleep(0.5)
    assert rows(str(store), f"SELECT count(*) AS n FROM activations WHERE run_id = '{run_id}'") == [{"n": 0}]


def test_jobs_api_errors(ray_head, tmp_path):
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    out = cli(ray_head, "jobs", "list", "--token-file", str(wrong))
    assert out.returncode == 1 and "error:" in out.stderr and "401" not in out.stdout, out.stdout + out.stderr
    out = cli(ray_head, "jobs", "status", "interplab-no-such-run")
    assert out.returncode == 2 and "no such job" in out.stderr, out.stderr
    out = interplab("jobs", "list", "--address", "127.0.0.1:1")
    assert out.returncode == 2 and "http://HEAD:8265" in out.stderr
