"""Every way out of the read-only SQL sandbox is refused with a clear message."""

from __future__ import annotations

import os

import pytest

from interplab.store import StoreError
from tests.store.conftest import make_rows, write_site


@pytest.fixture
def filled(store, tmp_path):
    with store.begin_run("capture", model="tiny", spec={}) as w:
        write_site(w, 0, "resid_pre", 3, make_rows(8, 4))
    return store


DATA = "{root}/data"
ATTACKS = {
    "copy_to": ("COPY (SELECT 1) TO '{root}/data/x.csv'", "only SELECT"),
    "copy_to_outside": ("COPY activations TO '/tmp/leak.parquet'", "only SELECT"),
    "etc_passwd_fn": ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    "etc_passwd_text": ("SELECT * FROM read_text('/etc/passwd')", "read_text"),
    "etc_passwd_scan": ("SELECT * FROM '/etc/passwd'", "file path"),
    "store_file_scan": ("SELECT * FROM '{root}/interplab-store.json'", "file path"),
    "dotdot": ("SELECT * FROM read_parquet('{root}/data/../../etc/passwd')", "read_parquet"),
    "dotdot_scan": ("SELECT * FROM '{root}/data/../runs/x.json'", "file path"),
    "glob": ("SELECT * FROM glob('/*')", "glob"),
    "subquery_fn": ("SELECT (SELECT count(*) FROM read_csv_auto('/etc/passwd')) AS n FROM runs", "read_csv_auto"),
    "cte_fn": ("WITH x AS (SELECT * FROM read_json('/etc/x.json')) SELECT * FROM x", "read_json"),
    "attach": ("ATTACH '/tmp/evil.db' AS evil", "only SELECT"),
    "install": ("INSTALL httpfs", "only SELECT"),
    "load": ("LOAD httpfs", "only SELECT"),
    "delete": ("DELETE FROM runs", "only SELECT"),
    "drop": ("DROP VIEW activations", "only SELECT"),
    "create": ("CREATE TABLE t AS SELECT 1", "only SELECT"),
    "set": ("SET enable_external_access = true", "only SELECT"),
    "pragma": ("PRAGMA database_list", "only SELECT"),
    "two_statements": ("SELECT 1; DROP VIEW runs", "exactly one"),
    "internal_table": ("SELECT * FROM _interplab_runs", "unknown table"),
    "settings_fn": ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
    "query_fn": ("SELECT * FROM query('SELECT 1')", "query"),
    "other_catalog": ("SELECT * FROM system.main.duckdb_tables", "unknown table"),
    "show": ("SHOW TABLES", "SHOW"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused(filled, name):
    query, message = ATTACKS[name]
    root = filled.location.root
    with pytest.raises(StoreError, match=message):
        filled.sql(query.format(root=root))
    assert not os.path.exists(f"{root}/data/x.csv") and not os.path.exists("/tmp/evil.db")


def test_session_is_locked_even_past_the_checker(filled):
    """Defence in depth: the DuckDB session itself refuses file access and configuration changes."""
    session = filled._current_session()
    con = session._con
    with pytest.raises(Exception, match="disabled by configuration|Permission"):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(Exception, match="disabled by configuration|Permission"):
        con.execute("ATTACH '/tmp/evil2.db'")
    assert not os.path.exists("/tmp/evil2.db")


def _values(table, *columns):
    return [tuple(row[c] for c in columns) for row in table.to_pylist()]


def test_read_queries_are_allowed_and_answer(filled):
    """Read queries run and return what was written: 8 rows of resid_pre.3 in one committed run."""
    written = make_rows(8, 4)
    expected = sorted(zip(written["prompt_id"].tolist(), written["position"].tolist(), written["token"]))
    run_id = filled.runs()[0].run_id

    assert _values(filled.sql("SELECT count(*) AS n FROM activations"), "n") == [(8,)]
    got = filled.sql("SELECT prompt_id, position, token, site, layer FROM activations ORDER BY prompt_id, position")
    assert _values(got, "prompt_id", "position", "token") == expected
    assert set(_values(got, "site", "layer")) == {("resid_pre", 3)}
    joined = filled.sql("WITH a AS (SELECT * FROM activations) SELECT count(*) AS n, min(kind) AS kind "
                        "FROM a JOIN runs USING (run_id)")
    assert _values(joined, "n", "kind") == [(8, "capture")]
    assert _values(filled.sql("SELECT i FROM range(3) t(i)"), "i") == [(0,), (1,), (2,)]
    assert _values(filled.sql("SELECT unnest([1, 2]) AS x"), "x") == [(1,), (2,)]
    runs = filled.sql("FROM runs")
    assert _values(runs, "run_id", "kind", "model", "status", "n_activation_rows") == [(run_id, "capture", "tiny", "committed", 8)]
    described = filled.sql("DESCRIBE SELECT * FROM activations")
    assert [c for (c,) in _values(described, "column_name")] == filled.sql("SELECT * FROM activations").column_names
    assert {"prompt_id", "position", "site", "layer", "act"} <= {c for (c,) in _values(described, "column_name")}


def test_malformed_sql(filled):
    with pytest.raises(StoreError, match="malformed SQL"):
        filled.sql("SELEC * FRM runs")
    with pytest.raises(StoreError, match="query failed"):
        filled.sql("SELECT no_such_column FROM runs")
