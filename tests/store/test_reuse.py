"""Reuse in the store: the content-key index, and runs that reference other runs' rows.

The referencing run is checked against an independent reference: the expected rows are selected from
the source arrays with plain numpy, and the views and ``export`` must return exactly them, under the
new run's id and prompt ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from interplab.store import StoreError, open_store, reuse
from interplab.store.catalog import gc_plan

from tests.store.conftest import make_rows, write_site
from tests.store.test_s3 import s3_endpoint  # noqa: F401 - fixture: a moto S3 server on loopback

KEY = "0123456789abcdef0123456789abcdef"


def _keyed_run(store, key=KEY, commit=True):
    w = store.begin_run("capture", model="tiny", spec={}, provenance={reuse.CONTENT_KEY: key})
    write_site(w, 0, "resid_pre", 1, make_rows(8, 4), dtype="float32")
    if commit:
        w.commit()
    return w


def test_index_finds_committed_runs_with_the_key_only(store):
    first = _keyed_run(store)
    second = _keyed_run(store)
    running = _keyed_run(store, commit=False)
    failed = _keyed_run(store, commit=False)
    failed.fail("boom")
    _keyed_run(store, key="f" * 32)
    found = reuse.runs_with_key(store, KEY)
    assert [r.run_id for r in found] == [second.run_id, first.run_id]  # newest commit first
    assert running.run_id not in {r.run_id for r in found}
    assert store.location.path(reuse.index_entry(KEY, first.run_id))
    assert reuse.runs_with_key(store, "a" * 32) == []


def test_an_index_record_without_a_commit_is_ignored_and_reindex_restores_missing_records(store):
    w = _keyed_run(store, commit=False)
    reuse.write_index_entry(store.location, KEY, w.run_id, {})  # crashed between index and commit
    assert reuse.runs_with_key(store, KEY) == []
    done = _keyed_run(store)
    from interplab.store import fs

    fs.delete_file(store.location, store.location.path(reuse.index_entry(KEY, done.run_id)))
    assert reuse.runs_with_key(store, KEY) == []
    assert [r.run_id for r in reuse.runs_with_key(store, KEY, scan=True)] == [done.run_id]
    assert reuse.reindex(store) == 1
    assert [r.run_id for r in reuse.runs_with_key(store, KEY)] == [done.run_id]


def test_bad_keys_are_refused(store):
    with pytest.raises(StoreError, match="content key"):
        reuse.runs_with_key(store, "../../etc")


def _source_run(store, d=6):
    """A committed run: prompts 0..3 x positions 0..3 of resid_pre.1 and z.2 (all heads)."""
    resid = make_rows(16, d, seed=1)
    z = make_rows(16 * 2, d, seed=2)
    z["prompt_id"] = np.repeat(resid["prompt_id"], 2)
    z["position"] = np.repeat(resid["position"], 2)
    heads = np.tile(np.arange(2, dtype=np.int32), 16)
    w = store.begin_run("capture", model="tiny", spec={})
    write_site(w, 0, "resid_pre", 1, resid, dtype="float32")
    write_site(w, 0, "z", 2, z, head=heads, dtype="float32")
    w.write_table(
        "prompts",
        pa.table(
            {
                "prompt_id": [0, 1, 2, 3],
                "n_tokens": [4] * 4,
                "token_ids": [[i, 1, 2, 3] for i in range(4)],
                "tokens": [["a", "b", "c", "d"]] * 4,
            }
        ),
    )
    w.commit()
    return store.run(w.run_id), resid, z, heads


def _reusing_run(store, source, mapping, own_rows=None):
    """A run that references ``source``'s files with ``mapping`` = [(source prompt, new prompt)] at
    positions 1 and 3, and computes ``own_rows`` itself (resid_pre.1)."""
    w = store.begin_run("capture", model="tiny", spec={}, inputs=[source.run_id])
    rows = {name: [] for name in reuse.REUSED_ROWS_SCHEMA.names}
    for site, layer in (("resid_pre", 1), ("z", 2)):
        for old, new in mapping:
            for position in (1, 3):
                for name, value in zip(reuse.REUSED_ROWS_SCHEMA.names, (source.run_id, site, layer, old, new, position)):
                    rows[name].append(value)
    w.write_table(reuse.REUSED_ROWS, pa.table(rows, schema=reuse.REUSED_ROWS_SCHEMA))
    refs = [dataclasses.replace(e, source_run=source.run_id) for e in source.files if e.table == "activations"]
    w.add_references(0, refs)
    if own_rows is not None:
        write_site(w, 1, "resid_pre", 1, own_rows, dtype="float32")
    w.commit()
    return store.run(w.run_id)


def _expected(rows, mapping, heads=None):
    """The rows a referencing run shows, by hand: (new prompt, position, head) -> act."""
    out = {}
    for old, new in mapping:
        for i in range(len(rows["prompt_id"])):
            if rows["prompt_id"][i] == old and rows["position"][i] in (1, 3):
                head = None if heads is None else int(heads[i])
                out[(new, int(rows["position"][i]), head)] = rows["act"][i]
    return out


@pytest.fixture(params=["local", "s3"])
def any_store(request, monkeypatch):
    """The local store, and one on S3 (read through pyarrow datasets instead of DuckDB's reader)."""
    if request.param == "local":
        yield request.getfixturevalue("store")
        return
    import secrets

    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"reuse-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/store")
    yield store
    store.close()


def test_referenced_rows_appear_whole_under_the_new_run_and_prompt_ids(any_store):
    store = any_store
    source, resid, z, heads = _source_run(store)
    mapping = [(2, 10), (0, 11), (2, 12)]  # prompt 2 twice: a dataset with a duplicate prompt
    own = make_rows(8, 6, seed=3, prompt_offset=20)
    new = _reusing_run(store, source, mapping, own)
    assert new.inputs == (source.run_id,)
    assert {e.source_run for e in new.files if e.table == "activations"} == {source.run_id, None}

    got = store.sql(
        "SELECT prompt_id, position, head, act FROM activations WHERE run_id = $r AND site = 'resid_pre' ORDER BY ALL",
        {"r": new.run_id},
    ).to_pylist()
    want = _expected(resid, mapping)
    for i in range(len(own["prompt_id"])):
        want[(int(own["prompt_id"][i]), int(own["position"][i]), None)] = own["act"][i]
    assert {(r["prompt_id"], r["position"], r["head"]) for r in got} == set(want)
    for r in got:
        np.testing.assert_array_equal(np.array(r["act"], np.float32), want[(r["prompt_id"], r["position"], r["head"])])

    zrows = store.sql(
        "SELECT prompt_id, position, head, act FROM activations_d6 WHERE run_id = $r AND site = 'z'", {"r": new.run_id}
    ).to_pylist()
    zwant = _expected(z, mapping, heads)
    assert len(zrows) == len(zwant) == 3 * 2 * 2
    for r in zrows:
        np.testing.assert_array_equal(np.array(r["act"], np.float32), zwant[(r["prompt_id"], r["position"], r["head"])])
    # the source run is unchanged, and no row of it is shown under the new run's id twice
    assert store.sql("SELECT count(*) AS n FROM activations WHERE run_id = $r", {"r": source.run_id}).to_pylist()[0]["n"] == 48
    counts = store.sql("SELECT run_id, count(*) AS n FROM activations GROUP BY run_id").to_pylist()
    assert {r["run_id"]: r["n"] for r in counts}[new.run_id] == 3 * 2 + 8 + 3 * 2 * 2


def test_export_honours_references(any_store):
    store = any_store
    source, resid, z, heads = _source_run(store)
    mapping = [(3, 0), (1, 1)]
    new = _reusing_run(store, source, mapping)
    acts, index = store.export(new.run_id, "resid_pre.1", with_index=True)
    want = _expected(resid, mapping)
    keys = sorted(want)
    assert list(zip(index["prompt_id"].tolist(), index["position"].tolist())) == [(p, q) for p, q, _ in keys]
    np.testing.assert_array_equal(acts, np.stack([want[k] for k in keys]))
    head1 = store.export(new.run_id, "z.2", head=1)
    zwant = _expected(z, mapping, heads)
    np.testing.assert_array_equal(head1, np.stack([zwant[k] for k in sorted(zwant) if k[2] == 1]))


def test_a_run_never_deletes_files_it_references(store):
    source, _, _, _ = _source_run(store)
    refs = [dataclasses.replace(e, source_run=source.run_id) for e in source.files if e.table == "activations"]
    w = store.begin_run("capture", model="tiny", spec={})
    w.finish_chunk("activations", 0, refs)  # even listed in an ordinary chunk marker
    w.finish_chunk("activations", 0, [])  # a rewrite of the chunk drops files of the old attempt...
    for e in refs:  # ...but only its own
        assert store.location.fs.get_file_info(store.location.path(e.path)).size > 0
    with pytest.raises(StoreError, match="no other run"):
        w.add_references(0, [dataclasses.replace(refs[0], source_run=None)])
    with pytest.raises(StoreError, match="is not a file of run"):
        w.add_references(0, [dataclasses.replace(refs[0], source_run="other-run")])


def test_a_reused_run_is_kept_by_retention(store):
    source, _, _, _ = _source_run(store)
    new = _reusing_run(store, source, [(0, 0)])
    decisions = {d.run.run_id: d.kept for d in gc_plan(store.runs(), kinds=["capture"])}
    assert decisions[new.run_id] is None
    assert decisions[source.run_id] and new.run_id in decisions[source.run_id]
