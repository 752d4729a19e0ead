"""Many writers on S3 (a real moto server on loopback): conditional PUTs make claims and commits exact.

Four processes share one queue of 40 run ids: each walks all of them in its own order and claims an
id with ``begin_run(run_id=...)`` (a PUT of ``run.json`` with ``If-None-Match: *``), then writes and
commits it. Two of the four are SIGKILLed at random events (a claim, a chunk, a commit).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from interplab.store import fs, open_store

from tests.store.conftest import s3_env

boto3 = pytest.importorskip("boto3")

REPO = Path(__file__).resolve().parents[2]
IDS, PROCS, CHUNKS, ROWS, D = 40, 4, 2, 200, 16

WRITER = r"""
import random, sys
import numpy as np
from interplab.store import StoreError, open_store

uri, seed, ids, chunks, rows, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
store = open_store(uri, create=False)
order = list(range(ids))
random.Random(seed).shuffle(order)
start = order.index(seed * ids // 4)  # each process starts at its own quarter of the queue
order = order[start:] + order[:start]
print("ready", flush=True)
sys.stdin.readline()  # the parent's "go", once every writer is ready
for i in order:
    run_id = f"job-{i:02d}"
    try:
        writer = store.begin_run("capture", model="tiny", spec={"job": i}, run_id=run_id)
    except StoreError as exc:
        if "already exists" not in str(exc):
            raise
        continue
    print("claimed", run_id, flush=True)
    total = 0.0
    for chunk in range(chunks):
        act = np.random.default_rng(i * 100 + chunk).standard_normal((rows, d)).astype(np.float16)
        total += float(act.astype(np.float64).sum())
        entry = writer.write_activations(chunk, "resid_pre", 0, None, np.arange(rows) + chunk * rows,
                                         np.zeros(rows, np.int32), np.arange(rows), ["t"] * rows, act)
        writer.finish_chunk("activations", chunk, [entry])
        print("chunk", run_id, chunk, flush=True)
    writer.commit()
    print("committed", run_id, repr(total), flush=True)
print("done", flush=True)
"""


def expected_sum(job: int) -> float:
    import numpy as np

    return sum(
        float(np.random.default_rng(job * 100 + chunk).standard_normal((ROWS, D)).astype(np.float16).astype(np.float64).sum())
        for chunk in range(CHUNKS)
    )


@pytest.fixture
def s3(moto_endpoint, monkeypatch, request):
    env = s3_env(moto_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"writers-{request.node.name.replace('_', '-')[:30].lower()}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return env, f"s3://{bucket}/lab/store"


def test_conditional_put_creates_exactly_once(s3):
    _env, uri = s3
    loc = open_store(uri).location
    keys = [loc.path("race", f"k{i}.json") for i in range(10)]
    calls = [(k, f"writer-{w}".encode()) for k in keys for w in range(8)]
    random.Random(0).shuffle(calls)
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda call: fs.create_exclusive(loc, *call), calls))
    for key in keys:
        winners = [data for (k, data), ok in zip(calls, won) if k == key and ok]
        assert len(winners) == 1, key
        assert fs.read_bytes(loc, key) == winners[0]  # the winner's object, never overwritten by a loser


@pytest.mark.slow
def test_four_writers_two_killed(s3):
    env, uri = s3
    store = open_store(uri)
    child_env = {**os.environ, **env, "PYTHONPATH": f"{REPO}:{REPO / 'platform'}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, str(seed), str(IDS), str(CHUNKS), str(ROWS), str(D)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
        for seed in range(PROCS)
    ]
    for proc in procs:  # a barrier: all start claiming together
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.close()
    rng = random.Random(19)
    victims = {0: rng.randint(1, 12), 2: rng.randint(1, 12)}  # process → the event after which it is killed
    events: dict[int, list[list[str]]] = {i: [] for i in range(PROCS)}

    def follow(i: int) -> None:
        for line in procs[i].stdout:
            events[i].append(line.split())
            if i in victims and len(events[i]) == victims[i]:
                procs[i].send_signal(signal.SIGKILL)

    readers = [threading.Thread(target=follow, args=(i,)) for i in range(PROCS)]
    for t in readers:
        t.start()
    for i, proc in enumerate(procs):
        code = proc.wait(timeout=300)
        if i in victims:
            assert code in (-signal.SIGKILL, 0), proc.stderr.read()
        else:
            assert code == 0, proc.stderr.read()
    for t in readers:
        t.join()
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    assert any(events[i][-1][0] != "done" for i in victims)  # at least one kill landed mid-work

    # every id was claimed by exactly one process (the survivors tried them all)
    claims = [e[1] for evs in events.values() for e in evs if e[0] == "claimed"]
    assert len(claims) == len(set(claims))
    runs = {r.run_id: r for r in store.runs()}
    assert sorted(runs) == [f"job-{i:02d}" for i in range(IDS)]
    reported = {e[1]: float(e[2]) for evs in events.values() for e in evs if e[0] == "committed"}
    committed = {rid for rid, r in runs.items() if r.status == "committed"}
    assert set(reported) <= committed  # no committed run lost
    for i in range(PROCS):
        if i not in victims:
            assert events[i][-1] == ["done"]

    # each committed run visible exactly once, whole, with its own data
    got = store.sql(
        "SELECT run_id, count(*) AS n, count(DISTINCT prompt_id) AS k, sum(list_sum(act::DOUBLE[])) AS s "
        "FROM activations GROUP BY run_id"
    ).to_pylist()
    assert {r["run_id"] for r in got} == committed
    for row in got:
        assert row["n"] == row["k"] == CHUNKS * ROWS, row
        assert row["s"] == pytest.approx(expected_sum(int(row["run_id"][4:])), rel=1e-6, abs=1e-6)
    listed = store.sql("SELECT run_id, count(*) AS c FROM runs GROUP BY run_id HAVING c > 1")
    assert listed.num_rows == 0

    # abandoned runs (claimed by a killed writer) are collectable: gc fails them and removes their data
    abandoned = {rid for rid, r in runs.items() if r.status == "running"}
    store.gc(older_than_hours=0)
    after = {r.run_id: r.status for r in store.runs()}
    assert {rid for rid, s in after.items() if s == "committed"} == committed
    assert {rid for rid, s in after.items() if s != "committed"} == abandoned
    loc = store.location
    for info in fs.list_files(loc, loc.path("data")) + fs.list_files(loc, loc.path("chunks")):
        run_id = next(p.split("=", 1)[1] for p in info.path.split("/") if p.startswith("run_id=")) \
            if "/data/" in info.path else info.path.split("/chunks/", 1)[1].split("/", 1)[0]
        assert run_id in committed, info.path  # only committed runs keep data
    assert store.sql("SELECT count(*) AS n FROM activations").column("n")[0].as_py() == len(committed) * CHUNKS * ROWS
