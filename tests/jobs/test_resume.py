"""Resume: a killed (SIGKILL) job, resumed, equals an uninterrupted run row for row; an interrupted
one (Ctrl-C, SIGTERM) is marked failed; nothing of the unfinished run is visible meanwhile, and
neither leaves processes behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PLUGINS, REPO, interplab, job_env, kill_group, rows, run_id_of, session_pids

SPEC = """kind: capture
model: smollm2-135m
dataset: {builtin: ioi, limit: 80}
sites: [resid_post.0, resid_post.3, resid_post.6, resid_post.9, resid_post.12, resid_post.15, mlp_out.4, z.3]
positions: all
batch_size: 2
resources: {num_cpus: 0.5}
"""
N_CHUNKS = 40
ROWS = ("SELECT prompt_id, position, token_id, token, site, layer, head, act FROM activations "
        "WHERE run_id = $r ORDER BY prompt_id, position, site, layer, head")


def done_chunks(store: Path, run_id: str) -> int:
    return len(glob.glob(str(store / "chunks" / run_id / "job_chunks" / "*.json")))


def start_and_kill(spec: Path, store: Path, after_chunks: int = 3) -> tuple[subprocess.Popen, str]:
    """Start ``interplab run`` (embedded Ray, own session); SIGKILL its process group once some chunks are done."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "interplab.jobs", "run", str(spec), "--store", str(store), "--no-progress",
         "--recompute"],  # the store already holds this job's results (reference): compute them again
        cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 180
    before = {Path(p).name for p in glob.glob(str(store / "runs" / "*"))}
    run_id = None
    while time.time() < deadline and proc.poll() is None:
        runs = [Path(p).name for p in glob.glob(str(store / "runs" / "*")) if Path(p).name not in before]
        if runs:
            run_id = runs[0]
            if done_chunks(store, run_id) >= after_chunks:
                kill_group(proc, signal.SIGKILL)
                break
        time.sleep(0.01)
    assert run_id is not None and (proc.poll() is None or proc.returncode == -9), "job ended before the kill"
    return proc, run_id


def same_rows(store: str, run_a: str, run_b: str) -> None:
    from interplab.store import open_store

    with open_store(store, create=False) as s:
        a = s.sql(ROWS, {"r": run_a}).to_pylist()
        b = s.sql(ROWS, {"r": run_b}).to_pylist()
        pa = s.sql("SELECT * EXCLUDE (run_id) FROM prompts WHERE run_id = $r ORDER BY prompt_id", {"r": run_a}).to_pylist()
        pb = s.sql("SELECT * EXCLUDE (run_id) FROM prompts WHERE run_id = $r ORDER BY prompt_id", {"r": run_b}).to_pylist()
    assert len(a) == len(b) > 0
    assert a == b  # row for row, activations bit for bit
    assert pa == pb and len(pa) == 80


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_head):
    """An uninterrupted run of SPEC (on the shared test cluster, to save a Ray start)."""
    base = tmp_path_factory.mktemp("resume")
    spec = base / "spec.yaml"
    spec.write_text(SPEC)
    store = base / "store"
    proc = interplab("run", str(spec), "--store", str(store), "--no-progress",
                     env={**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"spec": spec, "store": store, "run_id": run_id_of(proc.stdout)}


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_rows(reference, ray_head):
    store = reference["store"]
    proc, run_id = start_and_kill(reference["spec"], store)
    proc.communicate(timeout=60)
    deadline = time.time() + 60
    while session_pids(proc.pid) and time.time() < deadline:  # the embedded Ray dies with its driver
        time.sleep(0.5)
    assert session_pids(proc.pid) == [], "the killed job left processes behind"
    done = done_chunks(store, run_id)
    assert 0 < done < N_CHUNKS, done
    state = rows(str(store), f"SELECT status FROM runs WHERE run_id = '{run_id}'")
    assert state == [{"status": "running"}]
    assert rows(str(store), f"SELECT count(*) AS n FROM activations WHERE run_id = '{run_id}'") == [{"n": 0}]
    resumed = interplab("run", "--resume", run_id, "--store", str(store), "--no-progress",
                        env={**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"({N_CHUNKS - done} computed, {done} already done)" in resumed.stdout
    same_rows(str(store), reference["run_id"], run_id)


GATED = "kind: gated\nn_chunks: 8\ngate: 3\nstate_dir: {state}\nretries: 0\nresources: {{num_cpus: 0.1}}\n"


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists; fails if ``proc`` ends first (``timeout`` only bounds a broken run)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended (exit {proc.returncode}) before {path.name} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout:g} s")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "inherited", "message"),
    [
        (signal.SIGINT, signal.SIG_DFL, "interrupted (Ctrl-C)"),
        # `cmd &` in a script (and so a test run started that way) hands SIGINT down ignored
        (signal.SIGINT, signal.SIG_IGN, "interrupted (Ctrl-C)"),
        (signal.SIGTERM, signal.SIG_DFL, "stopped (SIGTERM)"),  # interplab jobs stop, Kubernetes
    ],
    ids=["sigint", "sigint-inherited-ignored", "sigterm"],
)
def test_ctrl_c_marks_the_run_failed_and_shuts_ray_down(tmp_path, sig, inherited, message):
    """The signal comes while chunk c3 waits at its gate (``gated`` kind): 3 of 8 chunks are done and
    nothing can finish before the signal is handled, however loaded the machine; a lost signal
    leaves the job waiting at the gate, which the timeout below turns into a failure."""
    state = tmp_path / "state"
    state.mkdir()
    spec = tmp_path / "gated.yaml"
    spec.write_text(GATED.format(state=state))
    store = tmp_path / "store"
    env = job_env(PYTHONPATH=str(PLUGINS), INTERPLAB_JOB_KINDS="interplab_gate_kind")
    proc = subprocess.Popen(
        [sys.executable, "-m", "interplab.jobs", "run", str(spec), "--store", str(store), "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
    )
    try:
        wait_for_file(state / "at-gate", proc)
        os.kill(proc.pid, sig)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job was still running 120 s after {signal.Signals(sig).name}: the signal was lost")
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()
    assert proc.returncode == 130, out + err
    run_id = run_id_of(out)
    assert f"error: {message}" in err
    assert rows(str(store), f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [{"status": "failed"}]
    assert done_chunks(store, run_id) == 3  # c0..c2; c3 was interrupted at its gate
    assert rows(str(store), "SELECT count(*) AS n FROM runs WHERE status = 'committed'") == [{"n": 0}]
    deadline = time.time() + 60
    while session_pids(proc.pid) and time.time() < deadline:  # Ray was shut down cleanly
        time.sleep(0.5)
    assert session_pids(proc.pid) == []
    assert f"interplab run --resume {run_id}" in err  # says how to continue (resuming a failed run: test_run.py)
