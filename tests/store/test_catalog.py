"""SQL across stores: the catalog file, lab roots with team areas, dedupe, store/team columns, and
the read-only sandbox over every attached store."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from interplab.store import StoreError, open_catalog, open_store
from interplab.store.catalog import CATALOG_ENV, open_for_cli, read_catalog

from tests.store.conftest import make_rows, write_site


def write_catalog(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def lab(tmp_path):
    """A lab root with two team areas and a separate store; one capture run in each, rows known."""
    root = tmp_path / "lab"
    stores = {
        "lab": open_store(str(root)),
        "vision": open_store(str(root / "teams" / "vision")),
        "nlp": open_store(str(root / "teams" / "nlp")),
        "solo": open_store(str(tmp_path / "solo")),
    }
    data = {}
    for i, (name, store) in enumerate(stores.items()):
        rows = make_rows(8, 4, seed=i)
        data[f"run-{name}"] = rows
        with store.begin_run("capture", model="tiny", run_id=f"run-{name}", owner=f"owner-{name}") as w:
            write_site(w, 0, "resid_pre", 1, rows, dtype="float32")
        with store.begin_run("patching", run_id=f"patch-{name}") as w:
            w.write_table("baselines", pa.table({"sweep": ["s"], "name": [name], "value": [float(i)]}))
    catalog = write_catalog(
        tmp_path / "stores.toml",
        f'[stores.lab]\nuri = "{root}"\n\n[stores.vision-again]\nuri = "{root}/teams/vision"\n\n'
        f'[stores.solo]\nuri = "{tmp_path / "solo"}"\nteam = "probing"\n',
    )
    return {"root": root, "stores": stores, "data": data, "catalog": catalog, "tmp": tmp_path}


def test_catalog_lists_each_store_once_with_store_and_team(lab):
    with open_catalog(lab["catalog"]) as cat:
        names = [(s.name, s.team) for s in cat.stores]
        # the lab root brings its areas; the area listed again is the same store, read once
        assert names == [("lab", None), ("lab/nlp", "nlp"), ("lab/vision", "vision"), ("solo", "probing")]
        runs = cat.sql("SELECT run_id, store, team, owner FROM runs WHERE kind = 'capture' ORDER BY run_id").to_pylist()
        assert runs == [
            {"run_id": "run-lab", "store": "lab", "team": None, "owner": "owner-lab"},
            {"run_id": "run-nlp", "store": "lab/nlp", "team": "nlp", "owner": "owner-nlp"},
            {"run_id": "run-solo", "store": "solo", "team": "probing", "owner": "owner-solo"},
            {"run_id": "run-vision", "store": "lab/vision", "team": "vision", "owner": "owner-vision"},
        ]
        assert cat.sql("SELECT count(*) AS n, count(DISTINCT run_id) AS d FROM runs").to_pylist() == [{"n": 8, "d": 8}]
        # every view gains store and team; numbers match the rows each store was given
        got = cat.sql(
            "SELECT run_id, store, team, sum(list_sum(act)) AS s, count(*) AS n FROM activations GROUP BY ALL ORDER BY run_id"
        ).to_pylist()
        for row in got:
            rows = lab["data"][row["run_id"]]
            assert row["n"] == 8 and row["s"] == pytest.approx(float(rows["act"].astype(np.float64).sum()), rel=1e-5)
        assert {r["team"] for r in got} == {None, "nlp", "probing", "vision"}
        base = cat.sql("SELECT name, store, team FROM baselines ORDER BY name").to_pylist()
        assert base == [
            {"name": "lab", "store": "lab", "team": None},
            {"name": "nlp", "store": "lab/nlp", "team": "nlp"},
            {"name": "solo", "store": "solo", "team": "probing"},
            {"name": "vision", "store": "lab/vision", "team": "vision"},
        ]
        assert {"runs", "activations", "prompts", "baselines"} <= set(cat.views())


def test_a_run_id_in_two_stores_is_shown_once(lab, tmp_path):
    copy = open_store(str(tmp_path / "copy"))
    with copy.begin_run("capture", run_id="run-solo") as w:  # same id as solo's run, other data
        write_site(w, 0, "resid_pre", 1, make_rows(4, 4, seed=99), dtype="float32")
    cat = open_catalog(stores=[str(tmp_path / "solo"), str(tmp_path / "copy")])
    rows = cat.sql("SELECT run_id, count(*) AS n FROM activations GROUP BY run_id").to_pylist()
    assert rows == [{"run_id": "run-solo", "n": 8}]  # the first store's run, not both
    assert cat.duplicates == [("run-solo", str(tmp_path / "copy"))]
    assert [r.run_id for r in cat.runs()].count("run-solo") == 1
    # the same store named twice (another spelling of its path) is one store
    twice = open_catalog(stores=[str(tmp_path / "solo"), str(tmp_path / "solo") + "/"])
    assert len(twice.stores) == 1
    cat.close()


def test_widths_that_differ_across_stores(tmp_path):
    a, b = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    with a.begin_run("capture", run_id="wide") as w:
        write_site(w, 0, "resid_pre", 0, make_rows(4, 6), dtype="float32")
    with b.begin_run("capture", run_id="narrow") as w:
        write_site(w, 0, "z", 0, make_rows(4, 2), dtype="float32")
    cat = open_catalog(stores=[str(tmp_path / "a"), str(tmp_path / "b")])
    rows = cat.sql("SELECT run_id, len(act) AS d FROM activations GROUP BY ALL ORDER BY run_id").to_pylist()
    assert rows == [{"run_id": "narrow", "d": 2}, {"run_id": "wide", "d": 6}]
    assert cat.sql("SELECT count(*) AS n FROM activations_d6").to_pylist() == [{"n": 4}]
    cat.close()


def test_catalog_file_errors_name_the_entry(tmp_path):
    bad = {
        "lists no stores": "",
        "unknown key 'url'": '[stores.x]\nurl = "/x"\n',
        "uri must be": "[stores.x]\nteam = 't'\n",
        "areas must be": '[stores.x]\nuri = "/x"\nareas = "yes"\n',
        "not valid TOML": "[stores.x\n",
        "unknown top-level key": '[store.x]\nuri = "/x"\n',
    }
    for message, text in bad.items():
        with pytest.raises(StoreError, match=message):
            read_catalog(write_catalog(tmp_path / "c.toml", text))
    with pytest.raises(StoreError, match="no store catalog"):
        read_catalog(str(tmp_path / "missing.toml"))
    with pytest.raises(StoreError, match="catalog entry 'gone'"):
        open_catalog(write_catalog(tmp_path / "c.toml", f'[stores.gone]\nuri = "{tmp_path / "nothing"}"\n'))


def test_areas_false_reads_the_root_only(lab):
    path = write_catalog(lab["tmp"] / "root-only.toml", f'[stores.lab]\nuri = "{lab["root"]}"\nareas = false\n')
    cat = open_catalog(path)
    assert [s.name for s in cat.stores] == ["lab"]
    assert {r.run_id for r in cat.runs()} == {"run-lab", "patch-lab"}


def test_what_the_cli_reads(lab, monkeypatch):
    monkeypatch.delenv("INTERPLAB_STORE", raising=False)
    monkeypatch.setenv(CATALOG_ENV, lab["catalog"])
    assert len(open_for_cli((), None).stores) == 4  # no --store, no $INTERPLAB_STORE: the catalog
    monkeypatch.setenv("INTERPLAB_STORE", str(lab["tmp"] / "solo"))
    one = open_for_cli((), None)
    assert one.single and [s.name for s in one.stores] == [str(lab["tmp"] / "solo")]
    two = open_for_cli((str(lab["root"]), str(lab["tmp"] / "solo")), None)
    assert not two.single and len(two.stores) == 2  # --store names exactly those stores
    with pytest.raises(StoreError, match="not both"):
        open_for_cli((str(lab["root"]),), lab["catalog"])


def test_cli_sql_and_runs_over_a_catalog(lab, cli):
    out = cli("sql", "--catalog", lab["catalog"], "--format", "json", "SELECT team, count(*) AS n FROM runs GROUP BY team ORDER BY team")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == [{"team": "nlp", "n": 2}, {"team": "probing", "n": 2}, {"team": "vision", "n": 2}, {"team": None, "n": 2}]
    out = cli("sql", "--store", str(lab["root"]), "--store", str(lab["tmp"] / "solo"), "--format", "json",
              "SELECT DISTINCT store FROM activations ORDER BY store")
    assert [r["store"] for r in json.loads(out.stdout)] == sorted([str(lab["root"]), str(lab["tmp"] / "solo")])
    out = cli("runs", "--catalog", lab["catalog"], "--team", "vision", "--format", "json")
    assert sorted(r["run_id"] for r in json.loads(out.stdout)) == ["patch-vision", "run-vision"]
    shown = json.loads(cli("runs", "--catalog", lab["catalog"], "show", "run-nlp").stdout)
    assert shown["store"] == "lab/nlp" and shown["team"] == "nlp" and shown["owner"] == "owner-nlp"


# -- the sandbox holds for every attached store ----------------------------------------------------


def test_sandbox_over_a_catalog(lab):
    tmp = lab["tmp"]
    secret = tmp / "secret.parquet"
    pq.write_table(pa.table({"x": [42]}), secret)
    outside_store_data = lab["root"] / "teams" / "vision" / "runs" / "run-vision" / "run.json"
    inside = next((lab["root"] / "teams" / "vision" / "data").rglob("*.parquet"))
    cat = open_catalog(lab["catalog"])
    attacks = [
        f"SELECT * FROM read_parquet('{secret}')",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM read_text('{outside_store_data}')",
        f"SELECT * FROM read_parquet('{inside}')",  # even a store's own file: only through the views
        "SELECT * FROM s0.runs",  # the per-store schemas are not views
        "SELECT * FROM _interplab_runs_0",
        f"COPY (SELECT 1) TO '{tmp / 'x.csv'}'",
        f"ATTACH '{tmp / 'x.db'}'",
    ]
    for query in attacks:
        with pytest.raises(StoreError, match="refused"):
            cat.sql(query)
    assert not (tmp / "x.csv").exists()
    # layer 2 alone (the statement check bypassed): files outside every store's data/ stay unreadable
    con = cat._current_session()._con
    for path in (secret, outside_store_data):
        with pytest.raises(duckdb.Error):
            con.execute(f"SELECT * FROM read_text('{path}')").fetchall()
    assert con.execute(f"SELECT count(*) FROM read_parquet('{inside}')").fetchone() == (8,)  # inside data/: the views' files
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    assert os.path.exists(secret)
    cat.close()
