"""Fixtures for the job tests: the real CLI (in-process and as a subprocess), stores, a Ray head."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
JOBS_DIR = REPO / "jobs"
K8S_DIR = REPO / "k8s"
PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture
def cli():
    """Invoke the real ``interplab`` CLI in-process: ``cli("run", "spec.yaml")`` → click Result."""
    from interplab.cli.main import _register, cli as group

    _register()
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(group, list(args), catch_exceptions=False, env=env)

    return invoke


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything in this process calls ``ray.init`` (a refused spec never starts Ray)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the job reached Ray")

    monkeypatch.setattr(ray, "init", refuse)
    # a Ray session left by an earlier test in this process would be joined without ray.init
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def job_env(**extra: str) -> dict[str, str]:
    """Environment for ``interplab`` subprocesses: no inherited Ray address, offline, extra vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    env.update(extra)
    return env


def interplab(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run the ``interplab`` console script; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "interplab.jobs", *args], capture_output=True, text=True, timeout=timeout,
        env=env or job_env(), cwd=cwd or REPO,
    )


def run_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("run_id: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no run_id in output:\n{output}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group we started (start_new_session=True) — only our own processes."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head (``ray start --head --block``) on loopback with the dashboard / Jobs API and
    token auth. Yields ``{"address", "gcs", "token", "env"}``; stopped by killing its process group."""
    token = secrets.token_hex(16)
    gcs_port, dash_port = free_port(), free_port()
    # PYTHONPATH: the workers can import the test plugin kinds (tests/jobs/plugins)
    env = job_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONPATH=str(PLUGINS))
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs_port}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
             "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            ],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 90
    from ray.job_submission import JobSubmissionClient

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                kill_group(proc)
                raise RuntimeError(f"Ray head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
    try:
        yield {"address": address, "gcs": f"127.0.0.1:{gcs_port}", "token": token, "env": env}
    finally:
        stop_session(proc)


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (a Popen with start_new_session=True has sid == its pid)."""
    import glob

    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
            out.append(int(stat.split("/")[2]))
    return out


def stop_session(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session and everything it started (by pid)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(20):
        pids = session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.wait(timeout=10)


def rows(store: str, query: str) -> list[dict]:
    from interplab.store import open_store

    with open_store(store, create=False) as s:
        return s.sql(query).to_pylist()


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
