"""The same round trip against a real S3-compatible HTTP server (moto) on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pytest

from interplab.store import StoreError, open_store
from tests.store.conftest import make_rows, write_site

boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_store(s3_endpoint, monkeypatch, request):
    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"lab-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/team/store")
    yield store
    store.close()


def test_s3_round_trip(s3_store):
    # files stay under 5 MiB: moto 5.2 answers Arrow's CompleteMultipartUpload in a way Arrow 26 rejects
    f32, f16 = make_rows(300, 48, seed=1), make_rows(300, 48, seed=2, prompt_offset=1000)
    with s3_store.begin_run("capture", model="tiny", spec={"x": 1}) as w:
        w.finish_chunk("activations", 0, [write_site(w, 0, "resid_pre", 3, f32, dtype="float32")])
        w.finish_chunk("activations", 1, [write_site(w, 1, "resid_pre", 3, f16)])
        w.write_table("patching", pa.table({"sweep": ["s"], "method": ["m"], "layer": [0], "position": [1],
                                            "head": [None], "value": [0.5], "normalized": [1.0]}))
    pending = s3_store.begin_run("capture", model="tiny", spec={})
    write_site(pending, 0, "resid_pre", 3, make_rows(10, 48))

    got = s3_store.sql(
        "SELECT act FROM activations WHERE run_id = $r AND layer = 3 ORDER BY prompt_id, position", {"r": w.run_id}
    )
    acts = np.array(got.column("act").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(acts[:300], f32["act"])
    np.testing.assert_array_equal(acts[300:], f16["act"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(s3_store.export(w.run_id, "resid_pre.3")[:300], f32["act"])
    assert s3_store.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == 600  # pending is invisible
    assert s3_store.saved("patching_heatmap", run_id=w.run_id, sweep="s").num_rows == 1
    assert {r.run_id: r.status for r in s3_store.runs()} == {w.run_id: "committed", pending.run_id: "running"}
    with pytest.raises(StoreError, match="read_parquet"):
        s3_store.sql("SELECT * FROM read_parquet('s3://other/x.parquet')")

    w2 = s3_store.resume_run(pending.run_id)
    assert w2.written_chunks() == set()
    w2.fail("gave up")
    assert s3_store.gc()["failed_runs_cleaned"] == 1
    s3_store.delete_run(w.run_id)
    assert s3_store.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == 0
