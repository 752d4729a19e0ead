"""Fixtures for the store tests: a fresh local store, synthetic activation rows, a CLI runner."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner

from interplab.store import open_store


def make_rows(n: int, d: int, seed: int = 0, dtype=np.float32, prompt_offset: int = 0) -> dict:
    """Synthetic rows for one site: ``n`` rows of width ``d``, distinct (prompt_id, position) keys."""
    rng = np.random.default_rng(seed)
    return {
        "prompt_id": np.arange(n, dtype=np.int64) // 4 + prompt_offset,
        "position": np.arange(n, dtype=np.int32) % 4,
        "token_id": rng.integers(0, 50_000, n),
        "token": [f"tok{i}" for i in range(n)],
        "act": rng.standard_normal((n, d)).astype(dtype),
    }


def write_site(writer, chunk, site, layer, rows, head=None, dtype="float16"):
    return writer.write_activations(
        chunk, site, layer, head, rows["prompt_id"], rows["position"], rows["token_id"], rows["token"],
        rows["act"], dtype=dtype,
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture
def cli():
    from interplab.cli import store_cmds

    @click.group()
    def group() -> None:
        pass

    store_cmds.register(group)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(group, list(args), catch_exceptions=False)

    return invoke


# -- S3 emulator (moto server on loopback), shared by the S3 permission / many-writer tests ------------


def start_moto_server(env: dict | None = None, preamble: str = ""):
    """Start ``moto.server`` on a free loopback port, after running the Python code ``preamble`` in its
    process; return (process, endpoint URL). Stop it with ``stop_moto_server``."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{preamble}\nfrom moto.server import main\nmain()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                proc.wait()
                pytest.fail("moto server did not start")
            time.sleep(0.2)


def stop_moto_server(proc) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto S3 server for this module (no IAM enforcement)."""
    pytest.importorskip("boto3")
    proc, url = start_moto_server()
    yield url
    stop_moto_server(proc)


def s3_env(endpoint: str, key: str = "test", secret: str = "test") -> dict[str, str]:
    """The environment pyarrow and boto3 read to reach ``endpoint`` with these credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


# -- the shared local Ray cluster (one per session, also used by tests/runtime) ------------------------

from tests.runtime.conftest import ray_cluster  # noqa: E402, F401
