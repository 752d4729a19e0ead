"""The dashboard over a catalog of two stores: every run once, each with its store; run pages and
the activation browser read the store that holds the run."""

from __future__ import annotations

from fastapi.testclient import TestClient

from .builders import build_store


def test_two_stores_read_as_one(ui_store, tmp_path):
    from interplab.store.catalog import open_catalog
    from interplab.ui.app import create_app
    from interplab.ui.config import UIConfig

    first, first_ids = ui_store
    second_ids = build_store(tmp_path / "second")
    catalog = open_catalog(stores=[str(first), str(tmp_path / "second")])
    try:
        client = TestClient(create_app(UIConfig(), catalog))
        page = client.get("/runs?kind=capture&status=committed")
        assert page.status_code == 200
        for run_id in (first_ids["capture"], second_ids["capture"]):
            assert f">{run_id}<" in page.text
        assert str(tmp_path / "second") in page.text  # the store column
        rows = catalog.sql("SELECT run_id, store FROM runs WHERE kind = 'capture' AND status = 'committed'").to_pylist()
        assert {r["run_id"] for r in rows} == {first_ids["capture"], second_ids["capture"]}
        run = client.get(f"/runs/{second_ids['patching']}")
        assert run.status_code == 200 and 'id="heatmaps"' in run.text
        browse = client.get("/activations", params={"run_id": second_ids["capture"], "site": "resid_post", "layer": "0", "mode": "neuron", "neuron": "3"})
        assert browse.status_code == 200 and 'data-prompt-id="3"' in browse.text and "browser-error" not in browse.text
        from interplab.ui import activations  # the file read path finds the store holding the run: as SQL over the catalog

        probe = activations.Probe(run_id=second_ids["capture"], site="resid_post", layer=1, neuron=5, k=4)
        assert activations.browse(catalog, probe) == activations.browse_sql(catalog, probe)
    finally:
        catalog.close()
