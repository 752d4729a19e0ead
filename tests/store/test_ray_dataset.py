"""``to_ray_dataset``: the committed files of a selection as a Ray Dataset, checked against ``export``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from interplab.store import StoreError, act_matrix, to_ray_dataset
from interplab.store.ray_data import read_files, selection_files

from tests.store.conftest import make_rows, write_site


@pytest.fixture
def filled(store):
    """Two committed runs (sites resid_pre.1, resid_pre.2, attn_out.1; two chunks), one uncommitted."""
    runs = []
    for r in range(2):
        with store.begin_run("capture", model="tiny", spec={"r": r}) as w:
            for chunk in range(2):
                files = [
                    write_site(w, chunk, site, layer, make_rows(40, 8, seed=100 * r + 10 * chunk + i, prompt_offset=chunk * 10))
                    for i, (site, layer) in enumerate([("resid_pre", 1), ("resid_pre", 2), ("attn_out", 1)])
                ]
                w.finish_chunk("activations", chunk, files)
            w.write_table("baselines", pa.table({"sweep": ["s"], "name": ["clean"], "value": [float(r)]}))
        runs.append(w.run_id)
    pending = store.begin_run("capture", model="tiny")
    write_site(pending, 0, "resid_pre", 1, make_rows(40, 8, seed=99))
    return store, runs


def test_selection_by_table_and_filter(filled):
    store, (r0, r1) = filled
    assert len(selection_files(store, "activations")) == 12  # the pending run's file is not committed
    picked = selection_files(store, "activations", where="run_id = $r AND site = 'resid_pre' AND layer = 1", params={"r": r0})
    assert [(e.site, e.layer, e.chunk) for e in picked] == [("resid_pre", 1, "000000"), ("resid_pre", 1, "000001")]
    assert all(f"run_id={r0}/" in e.path for e in picked)
    assert len(selection_files(store, "activations", where="layer = 1")) == 8
    assert [e.table for e in selection_files(store, "baselines", where=f"run_id = '{r1}'")] == ["baselines"]
    # a query that names the (run, site, layer) to read
    by_query = selection_files(store, f"SELECT DISTINCT run_id, site, layer FROM activations WHERE run_id = '{r1}' AND site = 'attn_out'")
    assert [(e.site, e.layer) for e in by_query] == [("attn_out", 1)] * 2
    assert len(selection_files(store, "SELECT run_id FROM runs WHERE status = 'committed'")) == 12
    with pytest.raises(StoreError, match="only run_id, site, layer"):
        selection_files(store, "activations", where="prompt_id = 3")
    with pytest.raises(StoreError, match="malformed SQL|exactly one SQL statement"):
        selection_files(store, "activations", where="true; DROP TABLE x")
    with pytest.raises(StoreError, match="no committed table 'nope'"):
        selection_files(store, "nope")
    with pytest.raises(StoreError, match="run_id column"):
        selection_files(store, "SELECT site FROM activations")


def test_read_files_matches_export(filled):
    """The per-file reader (the body of the dataset's map_batches) against Store.export."""
    store, (r0, _r1) = filled
    loc = store.location
    items = pa.Table.from_pylist(
        [{"path": e.path, "table": e.table, "run_id": r0, "site": e.site, "layer": e.layer, "dtype": e.dtype, "d": e.d}
         for e in selection_files(store, "activations", where=f"run_id = '{r0}' AND site = 'resid_pre' AND layer = 2")]
    )
    decoded = read_files(items, filesystem=loc.fs, root=loc.root, decode=True)
    raw = read_files(items, filesystem=loc.fs, root=loc.root, decode=False)
    want = store.export(r0, "resid_pre.2")
    order = np.lexsort((decoded["position"].to_numpy(), decoded["prompt_id"].to_numpy()))
    np.testing.assert_array_equal(act_matrix(decoded)[order], want)
    np.testing.assert_array_equal(act_matrix(raw, "float16")[order], want)
    np.testing.assert_array_equal(act_matrix({"act": act_matrix(decoded)})[order], want)  # numpy batch format
    assert set(decoded["run_id"].to_pylist()) == {r0} and set(decoded["layer"].to_pylist()) == {2}
    assert set(decoded["site"].to_pylist()) == {"resid_pre"}
    with pytest.raises(StoreError, match="dtype"):
        act_matrix(raw)


def _ray_data_missing() -> str | None:
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:  # Ray Data imports pandas (the ray[data] extra)
        return f"Ray Data cannot be imported ({exc}); install the ray[data] extra"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_ray_data_missing() is not None, reason=str(_ray_data_missing()))
def test_ray_dataset_statistic_equals_export(filled, ray_cluster):
    store, (r0, r1) = filled
    ds = to_ray_dataset(store, "activations", where="site = 'resid_pre' AND layer = 1")

    def partial_sums(batch: pa.Table) -> dict:
        acts = act_matrix(batch)
        runs = np.array(batch["run_id"].to_pylist())
        return {"run_id": [r0, r1], "n": [int((runs == r).sum()) for r in (r0, r1)],
                "sum": [acts[runs == r].astype(np.float64).sum(0) for r in (r0, r1)],
                "sq": [float((acts[runs == r].astype(np.float64) ** 2).sum()) for r in (r0, r1)]}

    parts = ds.map_batches(partial_sums, batch_format="pyarrow").take_all()
    assert ds.count() == 2 * 2 * 40
    for run_id in (r0, r1):
        want = store.export(run_id, "resid_pre.1").astype(np.float64)
        mine = [p for p in parts if p["run_id"] == run_id]
        assert sum(p["n"] for p in mine) == len(want)
        np.testing.assert_allclose(np.sum([p["sum"] for p in mine], axis=0), want.sum(0), rtol=1e-12, atol=1e-9)
        assert sum(p["sq"] for p in mine) == pytest.approx(float((want**2).sum()), rel=1e-12)
    query = to_ray_dataset(store, f"SELECT run_id, 'attn_out' AS site, 1 AS layer FROM runs WHERE run_id = '{r1}'")
    assert query.count() == 2 * 40
