"""``interplab store usage`` and ``interplab runs gc``: bytes per team/owner/kind, retention with a
dry run, and the runs that are never deleted (running, pinned, reused)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from interplab.store import StoreError, open_store
from interplab.store.catalog import gc_plan, usage

from tests.store.conftest import make_rows, write_site


def commit_reference(store, run_id: str, source, *, with_field: bool) -> None:
    """A committed run whose manifest lists ``source``'s first file (as a reusing run's does)."""
    entry = dict(vars(source.files[0]))
    if with_field:
        entry["source_run"] = source.run_id
    else:
        entry.pop("source_run", None)  # an older manifest: only the path says whose file it is
    w = store.begin_run("capture", run_id=run_id, owner="carol", team="nlp")
    base = os.path.join(store.uri, "runs", run_id)
    record = {"run_id": run_id, "committed_at": datetime.now(timezone.utc).isoformat(), "metadata": {}, "files": [entry]}
    with open(os.path.join(base, "commit.json"), "w") as f:
        json.dump(record, f)
    assert store.run(w.run_id).status == "committed"


@pytest.fixture
def filled(store):
    specs = [  # run_id, kind, owner, team, rows
        ("cap-a", "capture", "alice", "vision", 16),
        ("cap-b", "capture", "bob", "vision", 8),
        ("pat-a", "patching", "alice", "nlp", 0),
    ]
    for run_id, kind, owner, team, n in specs:
        with store.begin_run(kind, run_id=run_id, owner=owner, team=team) as w:
            if n:
                write_site(w, 0, "resid_pre", 0, make_rows(n, 8), dtype="float32")
                write_site(w, 1, "resid_pre", 1, make_rows(n, 8, seed=1), dtype="float32")
            else:
                w.write_table("baselines", pa.table({"sweep": ["s"], "name": ["n"], "value": [1.0]}))
    failed = store.begin_run("capture", run_id="failed-1", owner="bob", team="vision")
    write_site(failed, 0, "resid_pre", 0, make_rows(4, 8))
    failed.fail("oom")
    return store


def disk_bytes(store, run_id: str) -> int:
    total = 0
    for table in os.listdir(os.path.join(store.uri, "data")):
        folder = os.path.join(store.uri, "data", table, f"run_id={run_id}")
        for dirpath, _, names in os.walk(folder):
            total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total


def test_usage_per_team_owner_kind_matches_the_files_on_disk(filled):
    commit_reference(filled, "reuser", filled.run("cap-a"), with_field=True)  # references, adds no bytes
    sizes = {r: disk_bytes(filled, r) for r in ("cap-a", "cap-b", "pat-a")}
    assert all(sizes.values())
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for run_id, team, owner, kind in (("cap-a", "vision", "alice", "capture"), ("cap-b", "vision", "bob", "capture"),
                                      ("pat-a", "nlp", "alice", "patching")):
        for dim, key in (("team", team), ("owner", owner), ("kind", kind)):
            expected[(dim, key)] += sizes[run_id]
    expected[("owner", "carol")] += 0
    rows = usage(filled.runs())
    got = {(r["by"], r["key"]): r["bytes"] for r in rows}
    assert got == dict(expected)
    runs_per = {(r["by"], r["key"]): r["runs"] for r in rows}
    assert runs_per[("team", "nlp")] == 2 and runs_per[("owner", "carol")] == 1  # the failed run is not counted
    with pytest.raises(StoreError, match="usage by"):
        usage([], by=["host"])


def test_usage_cli(filled, cli):
    out = cli("store", "usage", "--store", filled.uri, "--by", "team", "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert {r["key"]: r["bytes"] for r in rows} == {
        "vision": disk_bytes(filled, "cap-a") + disk_bytes(filled, "cap-b"),
        "nlp": disk_bytes(filled, "pat-a"),
    }
    table = cli("store", "usage", "--store", filled.uri).stdout
    assert "owner" in table and "alice" in table and "patching" in table


# -- retention -----------------------------------------------------------------------------------


def test_gc_plan_filters_and_protection(filled):
    commit_reference(filled, "reuser", filled.run("cap-b"), with_field=True)
    filled.begin_run("capture", run_id="running-1", inputs=["pat-a"])  # still running: reads pat-a
    filled.pin("cap-a")
    runs = filled.runs()
    later = datetime.now(timezone.utc) + timedelta(days=31)  # "now" a month on: every run is 31 days old

    def decided(**kw):
        return {d.run.run_id: d.kept for d in gc_plan(runs, **kw)}

    assert decided(older_than_days=30) == {}  # nothing is 30 days old yet
    plan = decided(older_than_days=30, now=later)
    assert plan == {
        "cap-a": "pinned",
        "cap-b": "its files are used by reuser",
        "pat-a": "an input of running-1",
        "failed-1": None,
        "reuser": None,
        "running-1": "still running",
    }
    assert decided(kinds=["patching"]) == {"pat-a": "an input of running-1"}
    assert decided(failed=True) == {"failed-1": None}
    assert decided(failed=True, kinds=["patching"]) == {}
    assert decided(older_than_days=40, now=later) == {}
    with pytest.raises(StoreError, match="select what to delete"):
        gc_plan(runs)


def test_a_manifest_path_alone_protects_the_run_it_names(filled):
    """A reusing manifest written without the origin field: the run_id= partition says whose file it is."""
    commit_reference(filled, "reuser", filled.run("cap-a"), with_field=False)
    plan = {d.run.run_id: d.kept for d in gc_plan(filled.runs(), kinds=["capture"])}
    assert plan["cap-a"] == "its files are used by reuser" and plan["reuser"] is None


def test_gc_cli_dry_run_then_yes(filled, cli):
    filled.pin("cap-a")
    commit_reference(filled, "reuser", filled.run("cap-b"), with_field=True)
    before = sorted(os.listdir(os.path.join(filled.uri, "runs")))
    out = cli("runs", "gc", "--store", filled.uri, "--kind", "capture", "--format", "json")
    assert out.exit_code == 0, out.output
    actions = {r["run_id"]: r["action"] for r in json.loads(out.stdout)}
    assert actions == {"cap-a": "keep (pinned)", "cap-b": "keep (its files are used by reuser)",
                       "failed-1": "would delete", "reuser": "would delete"}
    assert sorted(os.listdir(os.path.join(filled.uri, "runs"))) == before  # a dry run deletes nothing
    table = cli("runs", "gc", "--store", filled.uri, "--kind", "capture").stdout
    assert "would delete 2 run(s)" in table and "--yes" in table

    out = cli("runs", "gc", "--store", filled.uri, "--kind", "capture", "--yes")
    assert out.exit_code == 0 and "deleted 2 run(s)" in out.stdout
    left = {r.run_id for r in open_store(filled.uri, create=False).runs()}
    assert left == {"cap-a", "cap-b", "pat-a"}
    assert not os.path.exists(os.path.join(filled.uri, "data", "activations", "run_id=failed-1"))
    # the kept runs' data still reads, in full
    assert filled.sql("SELECT count(*) AS n FROM activations WHERE run_id = 'cap-b'").to_pylist() == [{"n": 16}]
    # once nothing reuses cap-b (reuser is gone), it can go
    out = cli("runs", "gc", "--store", filled.uri, "--kind", "capture", "--yes", "--format", "json")
    assert {r["run_id"]: r["action"] for r in json.loads(out.stdout)} == {"cap-a": "keep (pinned)", "cap-b": "deleted"}


def test_gc_without_selection_only_cleans_staging(filled, cli):
    staging = os.path.join(filled.uri, "data", "activations", "run_id=failed-1")
    assert os.path.exists(staging)
    out = cli("runs", "gc", "--store", filled.uri)
    assert out.exit_code == 0 and "failed_runs_cleaned: 1" in out.stdout
    assert not os.path.exists(staging)
    assert {r.run_id for r in filled.runs()} == {"cap-a", "cap-b", "pat-a", "failed-1"}  # records stay


def test_gc_usage_errors_exit_2(filled, cli):
    out = cli("runs", "gc", "--store", filled.uri, "--older-than", "-1")
    assert out.exit_code == 2 and out.stderr.startswith("error: --older-than")


def test_delete_refuses_pinned_and_reused_runs(filled, cli):
    """``runs delete`` refuses, with exit code 2 and one line naming why and ``--force``, a pinned run,
    a run whose files a committed manifest lists and a run a running run names as input."""
    filled.pin("cap-a")
    commit_reference(filled, "reuser", filled.run("cap-b"), with_field=True)
    filled.begin_run("capture", run_id="running-1", inputs=["pat-a"])
    cases = {
        "cap-a": ["it is pinned", "interplab runs unpin cap-a"],
        "cap-b": ["its files are used by reuser", "Delete the runs that use it first"],
        "pat-a": ["it is an input of running-1", "Delete the runs that use it first"],
    }
    for run_id, phrases in cases.items():
        out = cli("runs", "delete", run_id, "--yes", "--store", filled.uri)
        assert out.exit_code == 2 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: refused to delete run {run_id}: ") and "--force" in lines[0]
        assert all(p in lines[0] for p in phrases), lines[0]
    assert {"cap-a", "cap-b", "pat-a"} <= {r.run_id for r in open_store(filled.uri, create=False).runs()}
    assert filled.export("cap-b", "resid_pre.0").shape == (8, 8)  # its data is all there

    # a run nothing depends on goes; once reuser is gone cap-b goes too; --force overrides a pin
    assert cli("runs", "delete", "reuser", "--yes", "--store", filled.uri).exit_code == 0
    assert cli("runs", "delete", "cap-b", "--yes", "--store", filled.uri).exit_code == 0
    out = cli("runs", "delete", "cap-a", "--yes", "--force", "--store", filled.uri)
    assert out.exit_code == 0 and out.stdout.strip() == "deleted cap-a"
    left = {r.run_id for r in open_store(filled.uri, create=False).runs()}
    assert left == {"pat-a", "failed-1", "running-1"}
    assert not os.path.exists(os.path.join(filled.uri, "data", "activations", "run_id=cap-a"))


def test_delete_refusal_lists_every_reason(filled):
    from interplab.store.catalog import deletion_refused

    filled.pin("cap-b")
    commit_reference(filled, "reuser", filled.run("cap-b"), with_field=True)
    filled.begin_run("capture", run_id="running-1", inputs=["cap-b"])
    runs = filled.runs()
    info = filled.run("cap-b")
    assert deletion_refused(info, runs) == "it is pinned; its files are used by reuser; it is an input of running-1"
    assert deletion_refused(filled.run("reuser"), runs) is None
