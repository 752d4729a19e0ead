"""The numpy read path for a neuron or a direction (``store/neurons.py``) against the store's own SQL
over the ``activations`` view and against numpy over the rows written: float16 and float32 files,
several row groups per file, all-heads sites, and a run that reuses another run's files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from interplab.store import actfile, neurons, open_store, reuse
from interplab.store.errors import StoreError

D = 8
N_PROMPTS, N_POS = 300, 10  # 3,000 rows: three row groups of 1,024 rows with the patched size


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(actfile, "ROW_GROUP_BYTES", 1)  # the smallest row groups (1,024 rows): several per file
    s = open_store(str(tmp_path / "store"))
    yield s
    s.close()


def rows(seed: int, heads: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_PROMPTS * N_POS * heads
    pid = np.repeat(np.arange(N_PROMPTS, dtype=np.int64), N_POS * heads)
    pos = np.tile(np.repeat(np.arange(N_POS, dtype=np.int32), heads), N_PROMPTS)
    act = rng.standard_normal((n, D)).astype(np.float32)
    act[rng.integers(0, n, 40), 3] = 4.0  # ties at the top of neuron 3
    out = {"prompt_id": pid, "position": pos, "act": act, "token": np.array([f"t{p}.{q}" for p, q in zip(pid, pos)])}
    if heads > 1:
        out["head"] = np.tile(np.arange(heads, dtype=np.int32), N_PROMPTS * N_POS)
    return out


def write_run(store, dtype: str) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
    resid, z = rows(1), rows(2, heads=2)
    w = store.begin_run("capture", model="tiny", spec={})
    for chunk, part in enumerate((slice(0, 2000), slice(2000, None))):  # two files of resid_post.1
        w.write_activations(
            chunk,
            "resid_post",
            1,
            None,
            resid["prompt_id"][part],
            resid["position"][part],
            np.zeros(len(resid["act"][part]), np.int32),
            resid["token"][part].tolist(),
            resid["act"][part],
            dtype=dtype,
        )
    w.write_activations(
        0,
        "z",
        2,
        z["head"],
        z["prompt_id"],
        z["position"],
        np.zeros(len(z["act"]), np.int32),
        z["token"].tolist(),
        z["act"],
        dtype=dtype,
    )
    w.commit()
    return w.run_id, resid, z


def stored(act: np.ndarray, dtype: str) -> np.ndarray:
    """The vectors as the store holds them, back in float32."""
    return act.astype(dtype).astype(np.float32)


def sql_scores(store, run_id, site, layer, head, neuron=None, direction=None) -> dict[tuple, float]:
    score = "act[$n + 1]" if neuron is not None else "list_inner_product(act::FLOAT[], $v::FLOAT[])"
    params = (
        {"r": run_id, "s": site, "l": layer, "n": neuron}
        if neuron is not None
        else {"r": run_id, "s": site, "l": layer, "v": direction}
    )
    where = "" if head is None else f" AND head = {int(head)}"
    table = store.sql(
        f"SELECT prompt_id, position, head, {score} AS x FROM activations WHERE run_id = $r AND site = $s AND layer = $l{where}",
        params,
    ).to_pylist()
    return {(r["prompt_id"], r["position"], r["head"]): r["x"] for r in table}


def got_scores(scores: neurons.Scores, heads: np.ndarray | None) -> dict[tuple, float]:
    keys = zip(scores.prompt_id.tolist(), scores.position.tolist(), [None] * len(scores) if heads is None else heads.tolist())
    return dict(zip(keys, scores.score.tolist()))


def reference_top(score: np.ndarray, pid: np.ndarray, pos: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(prompt, position of its max) of the k prompts with the largest max, by plain loops."""
    best: dict[int, tuple[float, int]] = {}
    for s, p, q in zip(score.tolist(), pid.tolist(), pos.tolist()):
        if p not in best or s > best[p][0] or (s == best[p][0] and q < best[p][1]):
            best[p] = (s, q)
    return [(p, q) for p, (s, q) in sorted(best.items(), key=lambda item: (-item[1][0], item[0], item[1][1]))[:k]]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_neuron_and_direction_equal_sql_and_numpy(store, dtype):
    run_id, resid, _ = write_run(store, dtype)
    info = store.run(run_id)
    want = stored(resid["act"], dtype)
    scores = neurons.score_rows(store.location, info, "resid_post", 1, neuron=3)
    assert len(scores) == len(want) and len(scores.parts) >= 3  # several row groups were read
    assert got_scores(scores, None) == sql_scores(store, run_id, "resid_post", 1, None, neuron=3)  # exact: a value as stored
    assert sorted(scores.score.tolist()) == sorted(want[:, 3].tolist())

    direction = np.linspace(-1, 1, D).astype(np.float32)
    scores = neurons.score_rows(store.location, info, "resid_post", 1, direction=direction)
    by_sql = sql_scores(store, run_id, "resid_post", 1, None, direction=direction.tolist())
    got = got_scores(scores, None)
    assert got.keys() == by_sql.keys()
    assert [got[key] for key in by_sql] == pytest.approx(list(by_sql.values()), rel=1e-5, abs=1e-5)
    reference = want.astype(np.float64) @ direction.astype(np.float64)
    order = np.lexsort((scores.position, scores.prompt_id))
    ref_order = np.lexsort((resid["position"], resid["prompt_id"]))
    assert scores.score[order] == pytest.approx(reference[ref_order], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("candidates", [None, 1], ids=["candidates", "every-row"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_top_prompts_equal_a_plain_loop_and_sql(store, dtype, candidates):
    run_id, resid, _ = write_run(store, dtype)
    scores = neurons.score_rows(store.location, store.run(run_id), "resid_post", 1, neuron=3)
    best = neurons.top_prompts(scores, 12, candidates)  # neuron 3 has 40 tied rows at 4.0 at the top
    got = list(zip(scores.prompt_id[best].tolist(), scores.position[best].tolist()))
    assert got == reference_top(stored(resid["act"], dtype)[:, 3], resid["prompt_id"], resid["position"], 12)
    by_sql = store.sql(
        "SELECT prompt_id, max(act[4]) AS m FROM activations WHERE run_id = $r AND site = 'resid_post' "
        "GROUP BY prompt_id ORDER BY m DESC, prompt_id LIMIT 12",
        {"r": run_id},
    ).to_pylist()
    assert [p for p, _ in got] == [r["prompt_id"] for r in by_sql]


def test_heads_and_tokens(store):
    run_id, _, z = write_run(store, "float16")
    info = store.run(run_id)
    every = neurons.score_rows(store.location, info, "z", 2, neuron=5)
    assert len(every) == len(z["act"])
    one = neurons.score_rows(store.location, info, "z", 2, 1, neuron=5)
    assert got_scores(one, np.ones(len(one), np.int32)) == sql_scores(store, run_id, "z", 2, 1, neuron=5)
    picked = np.array([0, 17, len(one) - 1])
    names = neurons.tokens(store.location, one, picked)
    assert names == [f"t{p}.{q}" for p, q in zip(one.prompt_id[picked], one.position[picked])]


def test_a_run_that_reuses_another_runs_files(store):
    source_id, resid, _ = write_run(store, "float16")
    source = store.run(source_id)
    mapping = [(5, 100), (7, 101)]
    w = store.begin_run("capture", model="tiny", spec={}, inputs=[source_id])
    table = {name: [] for name in reuse.REUSED_ROWS_SCHEMA.names}
    for old, new in mapping:
        for position in (2, 4):
            for name, value in zip(reuse.REUSED_ROWS_SCHEMA.names, (source_id, "resid_post", 1, old, new, position)):
                table[name].append(value)
    w.write_table(reuse.REUSED_ROWS, pa.table(table, schema=reuse.REUSED_ROWS_SCHEMA))
    w.add_references(0, [dataclasses.replace(e, source_run=source_id) for e in source.files if e.table == "activations"])
    w.commit()
    scores = neurons.score_rows(store.location, store.run(w.run_id), "resid_post", 1, neuron=2)
    want = sql_scores(store, w.run_id, "resid_post", 1, None, neuron=2)
    assert got_scores(scores, None) == want and set(want) == {(n, q, None) for _, n in mapping for q in (2, 4)}
    picked = np.arange(len(scores))
    assert neurons.tokens(store.location, scores, picked) == [
        f"t{dict((n, o) for o, n in mapping)[p]}.{q}" for p, q in zip(scores.prompt_id, scores.position)
    ]


def test_bad_requests_name_the_problem(store):
    run_id, _, _ = write_run(store, "float32")
    info = store.run(run_id)
    with pytest.raises(StoreError, match="8 neurons"):
        neurons.score_rows(store.location, info, "resid_post", 1, neuron=8)
    with pytest.raises(StoreError, match="3 numbers"):
        neurons.score_rows(store.location, info, "resid_post", 1, direction=[1.0, 2.0, 3.0])
    with pytest.raises(StoreError, match="no activations at resid_post.4"):
        neurons.score_rows(store.location, info, "resid_post", 4, neuron=0)
    with pytest.raises(StoreError, match="exactly one"):
        neurons.score_rows(store.location, info, "resid_post", 1)
    running = store.begin_run("capture", model="tiny", spec={})
    with pytest.raises(StoreError, match="no activations"):
        neurons.score_rows(store.location, store.run(running.run_id), "resid_post", 1, neuron=0)


def test_an_s3_store_reads_the_same_rows(moto_endpoint, monkeypatch):
    """On S3 the files are read through the store's pyarrow filesystem; SQL reads them through
    pyarrow datasets: the same scores and tokens."""
    import secrets

    import boto3

    from tests.store.conftest import s3_env

    for key, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(actfile, "ROW_GROUP_BYTES", 1)
    bucket = f"neurons-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    s3 = open_store(f"s3://{bucket}/store")
    try:
        run_id, _, _ = write_run(s3, "float16")
        info = s3.run(run_id)
        direction = np.linspace(1, -1, D).astype(np.float32)
        scores = neurons.score_rows(s3.location, info, "resid_post", 1, direction=direction)
        by_sql = sql_scores(s3, run_id, "resid_post", 1, None, direction=direction.tolist())
        got = got_scores(scores, None)
        assert got.keys() == by_sql.keys()
        assert [got[k] for k in by_sql] == pytest.approx(list(by_sql.values()), rel=1e-5, abs=1e-5)
        picked = neurons.top_prompts(scores, 3)
        assert neurons.tokens(s3.location, scores, picked) == [
            f"t{p}.{q}" for p, q in zip(scores.prompt_id[picked], scores.position[picked])
        ]
    finally:
        s3.close()
