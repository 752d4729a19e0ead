"""Real processes: writers killed with SIGKILL at random points, and concurrent writers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interplab.store import open_store

SCRIPT = str(Path(__file__).with_name("writer_process.py"))
CHUNKS, ROWS, D = 12, 2000, 256


def _spawn(uri: str, run_id: str, mode: str, chunks, *extra: str) -> subprocess.Popen:
    args = [sys.executable, SCRIPT, uri, run_id, mode, ",".join(map(str, chunks)), str(ROWS), str(D), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count(store, run_id: str) -> int:
    return store.sql("SELECT count(*) AS n FROM activations WHERE run_id = $r", {"r": run_id}).column("n")[0].as_py()


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_nothing_partial(tmp_path):
    uri = str(tmp_path / "store")
    store = open_store(uri)
    expected = CHUNKS * ROWS * 2
    # time one full run (after imports) to spread the kills over the whole write + commit phase
    proc = _spawn(uri, "timing", "begin", range(CHUNKS))
    assert proc.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    duration = time.perf_counter() - start
    rng = random.Random(1234)
    outcomes = {"committed": 0, "invisible": 0}
    for attempt in range(14):
        run_id = f"kill-{attempt}"
        proc = _spawn(uri, run_id, "begin", range(CHUNKS))
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
        # the store stays fully readable, and the run is all or nothing
        n = _count(store, run_id)
        info = {r.run_id: r for r in store.runs()}.get(run_id)
        if info is not None and info.status == "committed":
            assert n == expected
            outcomes["committed"] += 1
        else:
            assert n == 0
            outcomes["invisible"] += 1
        store.sql("SELECT sum(list_sum(act::FLOAT[])) FROM activations")  # every visible file decodes
    assert outcomes["invisible"] > 0
    # killed runs can be finished: resume, write the missing chunks, commit → exactly once
    for info in store.runs(status="running"):
        writer = store.resume_run(info.run_id)
        missing = sorted(set(range(CHUNKS)) - writer.written_chunks())
        proc = _spawn(uri, info.run_id, "resume", missing)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert _count(store, info.run_id) == expected
    dupes = store.sql(
        "SELECT run_id, site, prompt_id, count(*) AS c FROM activations GROUP BY ALL HAVING c > 1"
    )
    assert dupes.num_rows == 0


@pytest.mark.slow
def test_four_concurrent_writers(tmp_path):
    uri = str(tmp_path / "store")
    store = open_store(uri)
    # (a) four processes, four runs
    procs = [_spawn(uri, f"own-{i}", "begin", range(6)) for i in range(4)]
    # (b) four processes sharing one run, chunk 3 written twice (a retried task)
    shared = store.begin_run("capture", model="tiny", spec={}, run_id="shared")
    procs += [_spawn(uri, "shared", "resume", chunks, "--no-commit") for chunks in ([0, 1, 2, 3], [3, 4], [5, 6], [7])]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    shared.commit()
    for i in range(4):
        assert _count(store, f"own-{i}") == 6 * ROWS * 2
    assert _count(store, "shared") == 8 * ROWS * 2
    stats = store.sql(
        "SELECT count(*) AS n, count(DISTINCT (run_id, site, prompt_id)) AS k FROM activations"
    ).to_pylist()[0]
    assert stats["n"] == stats["k"] == (4 * 6 + 8) * ROWS * 2
