"""The dashboard's SQL against independent computations: the activation browser's ranking,
histogram and projections against numpy over the same rows; the runs table's filters, sort and
pages against plain Python; per-kind page data against the rows written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from interplab.ui import activations, results, runs
from interplab.ui.snapshot import SessionCache, Snapshot

from .builders import CAPTURE_PROMPTS, D, PROBE_WEIGHTS, capture_acts, patching_rows


@pytest.fixture
def snap(ui_store):
    from interplab.store import open_store

    path, ids = ui_store
    store = open_store(str(path), create=False)
    cache = SessionCache()
    yield Snapshot(store, cache), ids
    cache.close()
    store.close()


def reference_top(scores: np.ndarray, pid: np.ndarray, pos: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """(prompt, position of its max, max) of the k prompts with the largest score, by plain loops."""
    best: dict[int, tuple[float, int]] = {}
    for s, p, q in zip(scores.tolist(), pid.tolist(), pos.tolist()):
        if p not in best or s > best[p][0]:
            best[p] = (s, q)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [(p, q, s) for p, (s, q) in ranked]


@pytest.mark.parametrize("path", ["files", "sql"])
@pytest.mark.parametrize("rows_per_prompt", [10, 1], ids=["top-rows", "by-prompt"])
@pytest.mark.parametrize("mode", ["neuron", "direction"])
def test_browser_matches_numpy(snap, monkeypatch, rows_per_prompt, mode, path):
    store, ids = snap
    browse = activations.browse if path == "files" else activations.browse_sql
    monkeypatch.setattr(activations, "TOP_ROWS_PER_PROMPT", rows_per_prompt)  # 1: forces the by-prompt query
    ref = capture_acts()
    vector = np.linspace(-1, 1, D).astype(np.float32)
    if mode == "neuron":
        probe = activations.Probe(run_id=ids["capture"], site="resid_post", layer=0, neuron=2, k=4, bins=7)
        scores = ref["act"][:, 2].astype(np.float64)
    else:
        probe = activations.Probe(run_id=ids["capture"], site="resid_post", layer=0, direction=tuple(vector.tolist()), k=4, bins=7)
        scores = ref["act"].astype(np.float64) @ vector.astype(np.float64)
    out = browse(store, probe)
    want = reference_top(scores, ref["prompt_id"], ref["position"], 4)
    got = [(e["prompt_id"], e["position"], e["activation"]) for e in out["examples"]]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-5)
    counts, edges = np.histogram(scores, bins=7, range=(scores.min(), scores.max()))
    assert out["histogram"]["counts"] == counts.tolist()
    assert out["histogram"]["lo"] == pytest.approx(edges[0], rel=1e-5) and out["histogram"]["hi"] == pytest.approx(edges[-1], rel=1e-5)
    first = out["examples"][0]  # every token of the prompt, each with its own score
    assert [t["token"] for t in first["tokens"]] == CAPTURE_PROMPTS[first["prompt_id"]]
    rows = np.flatnonzero(ref["prompt_id"] == first["prompt_id"])
    assert [t["activation"] for t in first["tokens"]] == pytest.approx(scores[rows].tolist(), rel=1e-5)


def test_browser_refuses_bad_input(snap):
    store, ids = snap
    with pytest.raises(activations.BrowserError, match="8 neurons"):
        activations.browse(store, activations.Probe(run_id=ids["capture"], site="resid_post", layer=0, neuron=8))
    with pytest.raises(activations.BrowserError, match="no activations at resid_post.7"):
        activations.browse(store, activations.Probe(run_id=ids["capture"], site="resid_post", layer=7, neuron=0))
    with pytest.raises(activations.BrowserError, match="exactly one"):
        activations.Probe(run_id="r", site="resid_post", layer=0)
    with pytest.raises(activations.BrowserError, match="site="):
        activations.Probe(run_id="r", site="resid_post; DROP", layer=0, neuron=1)
    assert activations.parse_vector("1, 2\n3") == (1.0, 2.0, 3.0) and activations.parse_vector("[0.5, -1]") == (0.5, -1.0)
    for bad in ("", "[1, nan]", "a b", '{"x": 1}'):
        with pytest.raises(activations.BrowserError):
            activations.parse_vector(bad)


def test_runs_table_filters_sorts_and_pages(snap):
    store, ids = snap
    every = runs.all_runs(store)
    assert {r["run_id"] for r in every} == set(ids.values())
    assert all(r["owner"] is not None for r in every)  # owner, or the user column where there is none
    q = runs.RunQuery.from_params({"kind": "patching", "sort": "run_id", "order": "asc"}, page_size=1)
    page = runs.query_runs(every, q)
    want = sorted(r["run_id"] for r in every if r["kind"] == "patching")
    assert page.total == len(want) == 2 and page.pages == 2 and [r["run_id"] for r in page.rows] == want[:1]
    page2 = runs.query_runs(every, runs.RunQuery.from_params({"kind": "patching", "sort": "run_id", "order": "asc", "page": "2"}, 1))
    assert [r["run_id"] for r in page2.rows] == want[1:]
    assert page.choices["status"] == ["committed", "failed", "running"]
    tagged = [dict(r, tags=["ioi"]) if r["kind"] == "circuit" else r for r in every]
    assert [r["run_id"] for r in runs.query_runs(tagged, runs.RunQuery.from_params({"tag": "ioi"}, 50)).rows] == [ids["circuit"]]
    for bad in ({"sort": "spec"}, {"order": "up"}, {"page": "0"}, {"page": "x"}):
        with pytest.raises(runs.QueryError):
            runs.RunQuery.from_params(bad, 50)
    assert runs.tags_of('["a", "b"]') == ["a", "b"] and runs.tags_of('{"team": "x", "ok": true}') == ["team=x", "ok"]
    assert runs.normalise({"user": "bob", "run_id": "r"})["owner"] == "bob"


def test_patching_panels_hold_every_row(snap):
    store, ids = snap
    data = results.patching(store, ids["patching"])
    written = patching_rows()
    panels = {p["sweep"]: p for p in data["panels"]}
    assert panels["resid_pre"]["axis"] == "position" and panels["head_out"]["axis"] == "head"
    for sweep, x in (("resid_pre", "position"), ("head_out", "head")):
        want = sorted((r["layer"], r[x], r["value"], r["normalized"]) for r in written if r["sweep"] == sweep)
        got = sorted((c["layer"], c["x"], c["value"], c["normalized"]) for c in panels[sweep]["cells"])
        assert got == pytest.approx(want)


def test_stored_directions_probe_weights_and_directions_table(snap):
    store, ids = snap
    listed = {(d["source"], d["run_id"], d["name"]): d for d in activations.stored_directions(store)}
    probe_key = ("probe_weights", ids["probe"], "probe resid_post.0 class yes")
    assert probe_key in listed and listed[probe_key]["d"] == D
    assert ("directions", ids["capture"], "probe-neuron5") in listed
    vector = activations.stored_direction(store, "|".join(probe_key))
    assert vector == pytest.approx(PROBE_WEIGHTS[1])
    probe = activations.Probe(run_id=ids["capture"], site="resid_post", layer=0, direction=vector, k=3)
    ref = capture_acts()
    scores = ref["act"].astype(np.float64) @ np.asarray(PROBE_WEIGHTS[1], np.float32).astype(np.float64)
    want = reference_top(scores, ref["prompt_id"], ref["position"], 3)
    assert [(e["prompt_id"], e["position"]) for e in activations.browse(store, probe)["examples"]] == [w[:2] for w in want]
    with pytest.raises(activations.BrowserError, match="not found"):
        activations.stored_direction(store, f"directions|{ids['capture']}|nope")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_file_read_path_equals_sql_path(tmp_path, dtype):
    """The same page data from the run's files (numpy) and from SQL alone: every example, token and
    shade, and the histogram; a neuron exactly, a direction to float32 rounding. Rows without a
    ``prompts`` row show the captured tokens."""
    from interplab.store import open_store

    rng = np.random.default_rng(3)
    n_prompts, n_pos, d = 50, 7, 16
    pid = np.repeat(np.arange(n_prompts, dtype=np.int64), n_pos)
    pos = np.tile(np.arange(n_pos, dtype=np.int32), n_prompts)
    act = rng.standard_normal((len(pid), d)).astype(np.float32)
    act[::13, 4] = 9.0  # tied maxima
    tokens = [f"<b>{p}.{q}</b>" for p, q in zip(pid, pos)]
    with open_store(str(tmp_path / "store")) as store:
        w = store.begin_run("capture", model="tiny", spec={})
        w.write_activations(0, "resid_post", 2, None, pid, pos, np.zeros(len(pid), np.int32), tokens, act, dtype=dtype)
        half = n_prompts // 2  # the other half has no prompts row
        w.write_table("prompts", pa.table({"prompt_id": pa.array(range(half), pa.int64()), "n_tokens": pa.array([n_pos] * half, pa.int32()),
                                           "token_ids": [list(range(n_pos))] * half,
                                           "tokens": [[f"p{p}.{q}" for q in range(n_pos)] for p in range(half)]}))
        w.commit()
        vector = tuple(rng.standard_normal(d).tolist())
        for probe in (activations.Probe(run_id=w.run_id, site="resid_post", layer=2, neuron=4, k=30, bins=9),
                      activations.Probe(run_id=w.run_id, site="resid_post", layer=2, direction=vector, k=30, bins=9)):
            fast, slow = activations.browse(store, probe), activations.browse_sql(store, probe)
            if probe.neuron is not None:
                assert fast == slow
                assert fast["examples"][0]["activation"] == 9.0 and fast["examples"][0]["prompt_id"] == 0
            else:
                assert [(e["prompt_id"], e["position"]) for e in fast["examples"]] == [(e["prompt_id"], e["position"]) for e in slow["examples"]]
                assert [[t["token"] for t in e["tokens"]] for e in fast["examples"]] == [[t["token"] for t in e["tokens"]] for e in slow["examples"]]
                assert [t["activation"] for e in fast["examples"] for t in e["tokens"]] == pytest.approx(
                    [t["activation"] for e in slow["examples"] for t in e["tokens"]], rel=1e-5, abs=1e-6)
                assert fast["histogram"]["n"] == slow["histogram"]["n"] == len(pid)
            shown = {t["token"] for e in fast["examples"] for t in e["tokens"]}
            assert any(t.startswith("<b>") for t in shown) and any(t.startswith("p") for t in shown)
