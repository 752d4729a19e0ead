"""Which files a query opens: a filter on run, site and layer reads only the files it selects.

No timing: the files a query must not open are overwritten with bytes that are not Parquet, so a
query that opened one fails; DuckDB's ``EXPLAIN ANALYZE`` profile gives the counts.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from interplab.store import StoreError, actfile, layout, open_store
from interplab.store.query import one_schema

RUNS, SITES, LAYERS, ROWS = 12, ("resid_pre", "resid_post"), 3, 8


def _value(run: int, site: int, layer: int) -> float:
    return 100.0 * run + 10.0 * site + layer


def _fill(store) -> list[str]:
    """RUNS committed runs, one file per (site, layer), every ``act`` value equal to ``_value(...)``."""
    ids = []
    for r in range(RUNS):
        with store.begin_run("capture", model="tiny", run_id=f"run-{r:02d}") as w:
            for s, site in enumerate(SITES):
                for layer in range(LAYERS):
                    act = np.full((ROWS, 4), _value(r, s, layer), np.float32)
                    w.write_activations(
                        0, site, layer, None, np.arange(ROWS), np.zeros(ROWS, np.int32), np.zeros(ROWS, np.int32), ["t"] * ROWS, act
                    )
        ids.append(w.run_id)
    return ids


def _files_read(profile: str) -> tuple[int, int, int]:
    """(files read, files scanned, files in the scans' lists), summed over the Parquet scans of an
    EXPLAIN ANALYZE profile."""
    read = re.findall(r"Total Files Read:\s*(\d+)", profile)
    scanned = re.findall(r"Scanning Files:\s*(\d+)/(\d+)", profile)
    assert read and len(read) == len(scanned), profile
    return sum(int(n) for n in read), sum(int(a) for a, _ in scanned), sum(int(b) for _, b in scanned)


QUERY = "SELECT count(*) AS n, min(act[1]) AS lo, max(act[1]) AS hi FROM activations WHERE run_id = $r AND site = $s AND layer = $l"


def test_filtered_query_opens_only_the_selected_files(tmp_path):
    store = open_store(str(tmp_path / "store"))
    ids = _fill(store)
    files = [e for r in store.runs(status="committed") for e in r.files if e.table == layout.ACTIVATIONS]
    assert len(files) == RUNS * len(SITES) * LAYERS and one_schema(files)

    target = {"r": ids[7], "s": "resid_post", "l": 2}
    want = {"n": ROWS, "lo": _value(7, 1, 2), "hi": _value(7, 1, 2)}
    assert store.sql(QUERY, target).to_pylist() == [want]
    assert _files_read(store.explain(QUERY, target)) == (1, 1, len(files))

    # Every other file becomes unreadable, except the view's first file, whose footer gives DuckDB
    # the schema of all of them (the manifests say they share it).
    first = files[0].path
    wanted = f"run_id={ids[7]}/site=resid_post/layer=2/"
    for entry in files:
        if entry.path != first and wanted not in entry.path:
            (tmp_path / "store" / entry.path).write_bytes(b"not a parquet file")
    fresh = open_store(str(tmp_path / "store"), create=False)  # a new session: nothing cached
    assert fresh.sql(QUERY, target).to_pylist() == [want]
    head = {"r": ids[0], "s": files[0].site, "l": files[0].layer}
    assert fresh.sql(QUERY, head).to_pylist()[0]["lo"] == _value(0, SITES.index(files[0].site), files[0].layer)
    with pytest.raises(StoreError, match="query failed"):  # a query that needs a damaged file does open it
        fresh.sql(QUERY, {**target, "r": ids[3]})
    fresh.close()
    store.close()


def test_files_without_a_recorded_schema_are_reconciled(tmp_path):
    """Manifests without ``schema_hash`` (older writers): the view reconciles the files' schemas and
    returns what it returns with the hashes."""
    store = open_store(str(tmp_path / "store"))
    ids = _fill(store)
    query = "SELECT run_id, site, layer, count(*) AS n, sum(act[1]) AS total FROM activations GROUP BY ALL ORDER BY ALL"
    with_hash = store.sql(query).to_pylist()
    filtered = store.sql(QUERY, {"r": ids[4], "s": "resid_pre", "l": 1}).to_pylist()
    store.close()
    for run_id in ids:
        path = tmp_path / "store" / layout.run_dir(run_id) / layout.COMMIT_FILE
        record = json.loads(path.read_text())
        for entry in record["files"]:
            entry.pop("schema_hash")
        path.write_text(json.dumps(record))
    old = open_store(str(tmp_path / "store"), create=False)
    files = [e for r in old.runs(status="committed") for e in r.files]
    assert {e.schema_hash for e in files} == {None} and not one_schema(files)
    assert old.sql(query).to_pylist() == with_hash
    assert old.sql(QUERY, {"r": ids[4], "s": "resid_pre", "l": 1}).to_pylist() == filtered
    assert len(with_hash) == RUNS * len(SITES) * LAYERS
    old.close()


def test_tables_with_different_columns_are_reconciled(store):
    """Two runs write one table with different columns: their hashes differ and the view shows both."""
    with store.begin_run("capture", run_id="a") as w:
        w.write_table("notes", pa.table({"x": [1, 2]}))
    with store.begin_run("capture", run_id="b") as w:
        w.write_table("notes", pa.table({"x": [3], "y": ["three"]}))
    entries = [e for r in store.runs() for e in r.files if e.table == "notes"]
    assert len({e.schema_hash for e in entries}) == 2 and not one_schema(entries)
    rows = store.sql("SELECT run_id, x, y FROM notes ORDER BY x").to_pylist()
    assert rows == [
        {"run_id": "a", "x": 1, "y": None},
        {"run_id": "a", "x": 2, "y": None},
        {"run_id": "b", "x": 3, "y": "three"},
    ]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("head", [None, 3, "array"], ids=["no-head", "one-head", "all-heads"])
def test_recorded_schema_hash_is_the_files_own(store, dtype, head):
    """The hash the writer records without reading the file equals the hash of the file's footer."""
    n, d = 6, 5
    heads = np.arange(n) % 2 if head == "array" else head
    with store.begin_run("capture") as w:
        entry = w.write_activations(
            0, "z", 1, heads, np.arange(n), np.zeros(n, np.int32), np.zeros(n, np.int32), ["t"] * n,
            np.ones((n, d), np.float32), dtype=dtype,
        )
        table_entry = w.write_table("notes", pa.table({"x": [1.5], "label": ["a"]}))
    path = store.location.path(entry.path)
    assert entry.schema_hash == layout.schema_hash(pq.read_schema(path))
    assert pq.read_schema(path).remove_metadata().equals(actfile.activation_schema(dtype, d))
    assert table_entry.schema_hash == layout.schema_hash(pq.read_schema(store.location.path(table_entry.path)))
    committed = store.run(w.run_id).files
    assert {e.path: e.schema_hash for e in committed} == {entry.path: entry.schema_hash, table_entry.path: table_entry.schema_hash}
    assert entry.schema_hash != layout.schema_hash(actfile.activation_schema(dtype, d + 1))


# -- queries that read only some runs run on views over those runs' files --------------------------

VIEWS = ["runs", "prompts", "activations", "activations_d4", "activations_d6", "notes"]


@pytest.mark.parametrize(
    "sql, params, runs",
    [
        ("SELECT count(*) FROM activations WHERE run_id = 'a'", None, {"a"}),
        ("SELECT * FROM activations x WHERE layer = 1 AND x.run_id = $r", {"r": "b"}, {"b"}),
        ("SELECT * FROM activations_d4 WHERE run_id IN ('a', 'b') AND site = 's'", None, {"a", "b"}),
        ("SELECT * FROM activations WHERE run_id IN ('a', 'b') AND run_id = 'b'", None, {"b"}),
        ("WITH c AS (SELECT * FROM activations WHERE run_id = 'a') SELECT count(*) FROM c, runs", None, {"a"}),
        ("SELECT (SELECT count(*) FROM activations WHERE run_id = 'a'), (SELECT 1 FROM activations WHERE run_id = 'c')", None, {"a", "c"}),
        ("SELECT * FROM activations WHERE run_id = 'a' OR run_id = 'b'", None, None),  # not a top-level AND term
        ("SELECT * FROM activations WHERE run_id = 'a' UNION ALL SELECT * FROM activations", None, None),
        ("SELECT * FROM activations a JOIN runs r USING (run_id) WHERE run_id = 'a'", None, None),  # a join
        ("SELECT * FROM activations x WHERE y.run_id = 'a'", None, None),  # another table's run_id
        ("SELECT * FROM activations WHERE run_id = $r", {"r": 3}, None),  # not a string
        ("SELECT * FROM activations WHERE run_id = $r", None, None),
        ("SELECT * FROM activations WHERE lower(run_id) = 'a'", None, None),
        ("SELECT * FROM prompts JOIN activations USING (run_id) WHERE run_id = 'a'", None, None),  # another data view
        ("SELECT * FROM notes WHERE run_id = 'a'", None, None),  # a kind's view: might read anything
        ("SELECT count(*) FROM runs WHERE run_id = 'a'", None, None),  # no activations read
        ("WITH activations AS (SELECT 1 AS run_id) SELECT * FROM activations WHERE run_id = 'a'", None, None),
    ],
)
def test_runs_read_from_the_parse_tree(sql, params, runs):
    from interplab.store.query import check_query
    from interplab.store.runfilter import runs_read

    got = runs_read(check_query(sql, VIEWS), params)
    assert got == (None if runs is None else frozenset(runs))


EQUIVALENT = [
    ("SELECT count(*) AS n, sum(act[1]) AS s FROM activations WHERE run_id = $r", {"r": "run-03"}),
    ("SELECT run_id, site, layer, count(*) AS n FROM activations WHERE run_id IN ('run-01', 'run-05') GROUP BY ALL ORDER BY ALL", None),
    ("SELECT * FROM activations WHERE run_id = 'run-05' AND layer = 1 ORDER BY site, prompt_id", None),
    ("SELECT * FROM activations_d8 WHERE run_id = 'run-00'", None),  # a width this run does not have
    ("SELECT run_id, act FROM activations_d8 WHERE run_id = 'run-05' ORDER BY prompt_id, site, layer", None),
    ("WITH x AS (SELECT * FROM activations WHERE run_id = $r) SELECT count(*) AS n, min(layer) AS l FROM x", {"r": "run-02"}),
    ("SELECT (SELECT count(*) FROM activations WHERE run_id = 'run-03') AS a, "
     "(SELECT max(act[2]) FROM activations WHERE run_id = 'run-04' AND site = 'resid_pre') AS b", None),
    ("SELECT count(*) AS n FROM activations WHERE run_id = 'no-such-run'", None),
    ("SELECT count(*) AS n FROM activations WHERE run_id = 'run-01' AND run_id = 'run-02'", None),
    ("SELECT count(*) AS n FROM activations WHERE run_id = 'run-01' OR run_id = 'run-02'", None),
]


@pytest.fixture
def mixed(tmp_path):
    """RUNS runs of width 4 (float16), one of width 8 and one of width 6 (float32), and a run that
    reuses rows of the width-6 run (references, store/reuse.py)."""
    from tests.store.test_reuse import _reusing_run, _source_run

    store = open_store(str(tmp_path / "store"))
    ids = _fill(store)
    with store.begin_run("capture", run_id="run-05b") as w:
        act = np.arange(ROWS * 8, dtype=np.float32).reshape(ROWS, 8)
        for layer in range(2):
            w.write_activations(
                0, "resid_pre", layer, None, np.arange(ROWS), np.arange(ROWS, dtype=np.int32) % 4,
                np.zeros(ROWS, np.int32), ["t"] * ROWS, act + layer, dtype="float32",
            )
    source, _, _, _ = _source_run(store)  # width 6, float32: resid_pre.1 and z.2 (two heads)
    reuser = _reusing_run(store, source, [(0, 7), (1, 8)])
    yield store, ids, reuser.run_id
    store.close()


def test_narrowed_views_give_the_full_views_results(mixed, monkeypatch):
    """Every query gives the same rows, columns and types whether it runs on views over the runs it
    names or over every file; the narrowed ones list only those runs' files."""
    from interplab.store import query

    store, ids, reuser = mixed
    cases = [(sql.replace("run-05'", "run-05b'"), params) for sql, params in EQUIVALENT]
    cases.append(("SELECT prompt_id, position, act FROM activations WHERE run_id = $r ORDER BY ALL", {"r": reuser}))
    monkeypatch.setattr(query, "NARROW_MIN_FILES", 10**9)
    full = [store.sql(sql, params) for sql, params in cases]
    store.close()
    monkeypatch.setattr(query, "NARROW_MIN_FILES", 0)
    for (sql, params), want in zip(cases, full):
        got = store.sql(sql, params)
        assert got.schema == want.schema, sql
        assert got.to_pylist() == want.to_pylist(), sql
    assert full[0].to_pylist()[0]["n"] == ROWS * len(SITES) * LAYERS
    assert len(full[-1]) == 2 * 2 * (1 + 2)  # the reusing run: 2 prompts x 2 positions of resid_pre.1 and z.2 (2 heads)
    n_files = sum(len([e for e in r.files if e.table == layout.ACTIVATIONS]) for r in store.runs(status="committed"))
    assert _files_read(store.explain(QUERY, {"r": ids[3], "s": "resid_pre", "l": 1})) == (1, 1, len(SITES) * LAYERS)
    assert len(SITES) * LAYERS < n_files
    monkeypatch.setattr(query, "NARROW_MIN_FILES", 10**9)
    store.close()
    assert _files_read(store.explain(QUERY, {"r": ids[3], "s": "resid_pre", "l": 1}))[2] > len(SITES) * LAYERS
