"""Writers → commit → SQL / export return the same numbers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from interplab.store import StoreError, open_store
from tests.store.conftest import make_rows, write_site


def _sql_acts(store, run_id, site="resid_pre", layer=3):
    t = store.sql(
        "SELECT act FROM activations WHERE run_id = $r AND site = $s AND layer = $l ORDER BY prompt_id, position",
        {"r": run_id, "s": site, "l": layer},
    )
    return np.array(t.column("act").to_pylist(), dtype=np.float32)


def test_float32_round_trip_is_exact(store):
    rows = make_rows(64, 24)
    with store.begin_run("capture", model="tiny", spec={"sites": ["resid_pre.3"]}) as w:
        write_site(w, 0, "resid_pre", 3, rows, dtype="float32")
    np.testing.assert_array_equal(_sql_acts(store, w.run_id), rows["act"])
    np.testing.assert_array_equal(store.export(w.run_id, "resid_pre.3"), rows["act"])
    t = store.sql("SELECT typeof(act) AS t FROM activations LIMIT 1")
    assert t.column("t")[0].as_py() == "FLOAT[24]"


def test_float16_round_trip_within_precision(store):
    rows = make_rows(64, 24)
    with store.begin_run("capture", model="tiny", spec={}) as w:
        write_site(w, 0, "resid_pre", 3, rows)  # float16 by default
    got = _sql_acts(store, w.run_id)
    np.testing.assert_array_equal(got, rows["act"].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got, rows["act"], rtol=1e-3, atol=1e-4)


def test_array_functions_work_on_act(store):
    rows = make_rows(32, 8)
    with store.begin_run("capture", model="tiny", spec={}) as w:
        write_site(w, 0, "resid_pre", 3, rows, dtype="float32")
    q = rows["act"][5]
    t = store.sql(
        "SELECT prompt_id, position, array_cosine_similarity(act, $q::FLOAT[8]) AS s, "
        "array_inner_product(act, $q::FLOAT[8]) AS ip FROM activations ORDER BY s DESC LIMIT 1",
        {"q": q.tolist()},
    ).to_pylist()[0]
    assert (t["prompt_id"], t["position"]) == (rows["prompt_id"][5], rows["position"][5])
    assert t["s"] == pytest.approx(1.0, abs=1e-6)
    assert t["ip"] == pytest.approx(float(q @ q), rel=1e-5)


def test_rewriting_a_chunk_replaces_it(store):
    w = store.begin_run("capture", model="tiny", spec={})
    for attempt in range(3):  # a retried task writes the same chunk again
        e = write_site(w, 0, "resid_pre", 3, make_rows(40, 8, seed=attempt))
        w.finish_chunk("activations", 0, [e])
    write_site(w, 1, "resid_pre", 3, make_rows(40, 8, seed=9, prompt_offset=10))
    w.commit()
    n = store.sql("SELECT count(*) AS n FROM activations").column("n")[0].as_py()
    assert n == 80
    np.testing.assert_allclose(_sql_acts(store, w.run_id)[:40], make_rows(40, 8, seed=2)["act"], rtol=1e-3, atol=1e-3)


def test_uncommitted_and_failed_runs_are_invisible(store):
    running = store.begin_run("capture", model="tiny", spec={})
    write_site(running, 0, "resid_pre", 3, make_rows(8, 4))
    with pytest.raises(RuntimeError):
        with store.begin_run("capture", model="tiny", spec={}) as failing:
            write_site(failing, 0, "resid_pre", 3, make_rows(8, 4))
            raise RuntimeError("boom")
    assert store.sql("SELECT count(*) AS n FROM activations").column("n")[0].as_py() == 0
    status = {r.run_id: r.status for r in store.runs()}
    assert status == {running.run_id: "running", failing.run_id: "failed"}
    assert "RuntimeError: boom" in store.run(failing.run_id).error
    t = store.sql("SELECT status, count(*) AS n FROM runs GROUP BY status ORDER BY status").to_pylist()
    assert t == [{"status": "failed", "n": 1}, {"status": "running", "n": 1}]


def test_resume_writes_only_missing_chunks(store):
    w = store.begin_run("capture", model="tiny", spec={}, run_id="resume-me")
    for chunk in (0, 1):
        w.finish_chunk("activations", chunk, [write_site(w, chunk, "resid_pre", 3, make_rows(8, 4, prompt_offset=10 * chunk))])
    w.fail("killed")
    w2 = store.resume_run("resume-me")
    assert w2.written_chunks() == {0, 1}
    for chunk in {0, 1, 2, 3} - w2.written_chunks():
        w2.finish_chunk("activations", chunk, [write_site(w2, chunk, "resid_pre", 3, make_rows(8, 4, prompt_offset=10 * chunk))])
    info = w2.commit()
    assert info.status == "committed" and info.rows == {"activations": 32}
    with pytest.raises(StoreError, match="committed"):
        store.resume_run("resume-me")
    with pytest.raises(StoreError, match="already exists"):
        store.begin_run("capture", run_id="resume-me")


def test_provenance_is_recorded(store):
    with store.begin_run("capture", model="SmolLM2-135M", spec={"batch": 8}, weight_hash="abc123",
                         provenance={"job": "j1"}) as w:
        write_site(w, 0, "resid_pre", 3, make_rows(4, 4))
    row = store.sql("SELECT * FROM runs").to_pylist()[0]
    assert row["model"] == "SmolLM2-135M" and row["weight_hash"] == "abc123" and row["status"] == "committed"
    assert row["spec"] == '{"batch": 8}' and row["package_version"] and row["user"] and row["host"]
    assert row["created_at"] <= row["committed_at"]
    assert store.run(w.run_id).provenance == {"job": "j1"}


def test_patching_table_and_metadata(store):
    table = pa.table({
        "sweep": ["resid", "resid", "heads"], "method": ["act", "act", "act"],
        "layer": [0, 1, 1], "position": [2, 2, 3], "head": [None, None, 4],
        "value": [0.1, 0.9, 0.5], "normalized": [0.0, 1.0, 0.5],
    })
    with store.begin_run("patching", model="tiny", spec={}) as w:
        w.write_table("patching", table, chunk="resid")
        w.write_table("patching", table, chunk="resid")  # idempotent
        w.write_table("baselines", pa.table({"sweep": ["resid"], "name": ["clean"], "value": [2.5]}))
        assert w.written_chunks("patching") == {"resid"}
    got = store.saved("patching_heatmap", run_id=w.run_id, sweep="resid").to_pylist()
    assert [(r["layer"], r["normalized"]) for r in got] == [(0, 0.0), (1, 1.0)]
    assert store.sql("SELECT value FROM baselines WHERE name = 'clean'").column(0)[0].as_py() == 2.5
    with pytest.raises(StoreError, match="missing columns"):
        store.begin_run("patching").write_table("patching", pa.table({"sweep": ["x"]}))


def test_generic_result_table_gets_a_view(store):
    with store.begin_run("custom", model="tiny", spec={}) as w:
        w.write_table("my_scores", pa.table({"src": ["a"], "dst": ["b"], "score": [0.3]}))
    assert store.sql("SELECT run_id, src, score FROM my_scores").to_pylist() == [{"run_id": w.run_id, "src": "a", "score": 0.3}]


def test_tables_with_a_view_file_get_its_columns(store):
    """analyses/circuits/views/edges.sql fixes the edges view's columns; files of another shape still read (all columns)."""
    edges = {"method": ["eap"], "src": ["a0.h1"], "dst": ["m2"], "src_layer": [0], "dst_layer": [2], "score": [0.5],
             "in_circuit": [True], "scratch": [1.0]}
    with store.begin_run("circuit", model="tiny", spec={}) as w:
        w.write_table("edges", pa.table(edges))
    got = store.sql("SELECT * FROM edges")
    assert got.column_names == ["run_id", "method", "src", "dst", "src_layer", "dst_layer", "score", "in_circuit"]
    with pytest.raises(StoreError, match="scratch"):
        store.sql("SELECT scratch FROM edges")
    with store.begin_run("circuit", model="tiny", spec={}) as w:
        w.write_table("circuits", pa.table({"src": ["a"], "dst": ["b"]}))  # no method/rule column
    assert store.sql("SELECT src, dst FROM circuits").to_pylist() == [{"src": "a", "dst": "b"}]


def test_mixed_widths_and_heads(store):
    resid = make_rows(8, 16)
    z = make_rows(8 * 3, 4, seed=1)
    with store.begin_run("capture", model="tiny", spec={}) as w:
        write_site(w, 0, "resid_pre", 3, resid, dtype="float32")
        write_site(w, 0, "z", 3, z, head=np.tile(np.arange(3, dtype=np.int32), 8), dtype="float32")
        write_site(w, 0, "z", 4, make_rows(8, 4, seed=2), head=1, dtype="float32")
    assert {"activations_d16", "activations_d4"} <= set(store.views())
    t = store.sql("SELECT typeof(act) AS t FROM activations_d16 LIMIT 1")
    assert t.column("t")[0].as_py() == "FLOAT[16]"
    np.testing.assert_array_equal(store.export(w.run_id, "z", layer=3, head=2), z["act"][2::3])
    assert store.export(w.run_id, "z.4.1").shape == (8, 4)
    top = store.saved("top_tokens_neuron", run_id=w.run_id, site="z", layer=3, neuron=0, head=2, k=1).to_pylist()
    assert top[0]["activation"] == pytest.approx(z["act"][2::3, 0].max())
    with pytest.raises(StoreError, match="no activations for site"):
        store.export(w.run_id, "resid_post.3")


def test_saved_nearest_and_direction(store):
    rows = make_rows(200, 32)
    with store.begin_run("capture", model="tiny", spec={}) as w:
        write_site(w, 0, "resid_pre", 3, rows)
    best = store.saved("nearest", run_id=w.run_id, site="resid_pre", layer=3, vector=rows["act"][17], k=1).to_pylist()
    assert (best[0]["prompt_id"], best[0]["position"]) == (rows["prompt_id"][17], rows["position"][17])
    direction = np.eye(32, dtype=np.float32)[5]
    top = store.saved("top_tokens_direction", run_id=w.run_id, site="resid_pre", layer=3, direction=direction, k=1)
    assert top.column("projection")[0].as_py() == pytest.approx(rows["act"][:, 5].astype(np.float16).max(), rel=1e-3)


def test_delete_and_gc(store):
    with store.begin_run("capture", model="tiny", spec={}) as keep:
        write_site(keep, 0, "resid_pre", 3, make_rows(4, 4))
    gone = store.begin_run("capture", model="tiny", spec={})
    write_site(gone, 0, "resid_pre", 3, make_rows(4, 4))
    gone.commit()
    failed = store.begin_run("capture", model="tiny", spec={})
    write_site(failed, 0, "resid_pre", 3, make_rows(4, 4))
    failed.fail("oom")
    store.delete_run(gone.run_id)
    with pytest.raises(StoreError, match="unknown run id"):
        store.run(gone.run_id)
    assert store.gc() == {"failed_runs_cleaned": 1, "abandoned_runs_failed": 0, "temp_files_removed": 0}
    assert store.run(failed.run_id).status == "failed"
    assert store.sql("SELECT DISTINCT run_id FROM activations").to_pylist() == [{"run_id": keep.run_id}]


def test_abandoned_running_run_is_collected(store):
    w = store.begin_run("capture", model="tiny", spec={})
    write_site(w, 0, "resid_pre", 3, make_rows(4, 4))
    assert store.gc(older_than_hours=0)["abandoned_runs_failed"] == 1
    assert store.run(w.run_id).status == "failed"


def test_bad_writer_input(store):
    w = store.begin_run("capture", model="tiny", spec={})
    rows = make_rows(4, 4)
    with pytest.raises(StoreError, match="act has"):
        w.write_activations(0, "resid_pre", 3, None, rows["prompt_id"], rows["position"], rows["token_id"],
                            rows["token"], rows["act"][:3])
    with pytest.raises(StoreError, match="dtype"):
        write_site(w, 0, "resid_pre", 3, rows, dtype="bfloat16")
    with pytest.raises(StoreError, match="invalid run id"):
        store.begin_run("capture", run_id="../evil")
    with pytest.raises(StoreError, match="invalid site kind"):
        write_site(w, 0, "Resid/../x", 3, rows)


def test_not_a_store(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(StoreError, match="not an interplab store"):
        open_store(str(tmp_path), create=False)
    with pytest.raises(StoreError, match="not empty"):
        open_store(str(tmp_path))
    with pytest.raises(StoreError, match="no interplab store"):
        open_store(str(tmp_path / "missing"), create=False)
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("gs://bucket/x")


def test_env_var_selects_store(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_STORE", str(tmp_path / "envstore"))
    assert open_store().uri == str(tmp_path / "envstore")
