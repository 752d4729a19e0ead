"""Provenance on every run: owner/team resolution, git state, hashes, inputs, timings, annotations,
and old run.json files that lack all of it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from interplab.store import StoreError, open_store
from interplab.store import provenance as pv

from tests.store.conftest import make_rows, write_site


@pytest.fixture
def clean_env(monkeypatch):
    for var in (pv.USER_ENV, pv.TEAM_ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def one(store, query):
    rows = store.sql(query).to_pylist()
    assert len(rows) == 1, rows
    return rows[0]


# -- owner and team ------------------------------------------------------------------------------


def test_owner_resolution_order(store, clean_env):
    clean_env.setattr(pv.getpass, "getuser", lambda: "os-user")
    service = {"service": {"user": "token-user", "url": "http://x"}}
    assert store.begin_run("capture", run_id="a", owner="cli-user", provenance=service).run_id == "a"
    assert store.begin_run("capture", run_id="b", provenance=service).run_id == "b"
    store.begin_run("capture", run_id="c")
    clean_env.setenv(pv.USER_ENV, "env-user")
    store.begin_run("capture", run_id="d", provenance=service)
    store.begin_run("capture", run_id="e", user="old-kwarg")  # the pre-owner keyword still works
    owners = {r.run_id: r.owner for r in store.runs()}
    assert owners == {"a": "cli-user", "b": "token-user", "c": "os-user", "d": "env-user", "e": "old-kwarg"}
    assert {r.run_id: r.user for r in store.runs()} == owners  # the old `user` field = owner
    assert one(store, "SELECT owner, \"user\" FROM runs WHERE run_id = 'b'") == {"owner": "token-user", "user": "token-user"}
    with pytest.raises(StoreError, match="give one"):
        store.begin_run("capture", owner="x", user="y")


def test_team_resolution_order(tmp_path, clean_env):
    lab = open_store(str(tmp_path / "lab"))
    area = open_store(str(tmp_path / "lab" / "teams" / "vision"))
    plain = open_store(str(tmp_path / "plain"))
    marked = open_store(str(tmp_path / "marked"), team="probing")  # a team area by its marker
    assert (lab.team, area.team, plain.team, marked.team) == (None, "vision", None, "probing")
    assert lab.team_areas() == {"vision": str(tmp_path / "lab" / "teams" / "vision")}
    area.begin_run("capture", run_id="from-area")
    area.begin_run("capture", run_id="explicit", team="nlp")
    plain.begin_run("capture", run_id="none")
    clean_env.setenv(pv.TEAM_ENV, "env-team")
    area.begin_run("capture", run_id="env")
    assert {r.run_id: r.team for r in area.runs()} == {"from-area": "vision", "explicit": "nlp", "env": "env-team"}
    assert plain.run("none").team is None


# -- what the run was made from ---------------------------------------------------------------


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_of_a_spec_file(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    spec = repo / "job.yaml"
    spec.write_text("kind: capture\n")
    _git(repo, "add", "job.yaml")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "spec")
    head = _git(repo, "rev-parse", "HEAD")
    state = pv.git_state(str(spec))
    assert state is not None and (state.commit, state.dirty) == (head, False)
    assert os.path.realpath(state.repo) == os.path.realpath(repo)
    spec.write_text("kind: capture\nmodel: x\n")
    assert pv.git_state(str(spec)).dirty is True
    outside = tmp_path / "loose.yaml"
    outside.write_text("x")
    assert pv.git_state(str(outside)) is None  # no repository: no git fields, no error
    assert pv.git_state(str(tmp_path / "missing" / "x.yaml")) is None


def test_hashes_inputs_and_git_are_recorded_and_in_the_runs_view(store, clean_env):
    spec = {"kind": "capture", "model": "tiny", "sites": ["resid_pre.3"], "b": [1, 2]}
    expected_spec_hash = hashlib.sha256(
        b'{"b":[1,2],"kind":"capture","model":"tiny","sites":["resid_pre.3"]}'
    ).hexdigest()  # canonical JSON written out by hand
    git = {"commit": "a" * 40, "dirty": True, "repo": "/r"}
    with store.begin_run(
        "capture", model="tiny", spec=spec, weight_hash="w1", run_id="r1", inputs=["r0", "r0", "rx"], git=git,
        provenance={"prompts_sha256": "p" * 16}, team="vision", owner="alice",
    ) as w:
        write_site(w, 0, "resid_pre", 3, make_rows(8, 4))
    info = store.run("r1")
    assert info.spec_hash == expected_spec_hash
    assert info.dataset_hash == "p" * 16  # the job kind's own data hash
    assert info.inputs == ("r0", "rx")  # order kept, duplicates dropped
    assert (info.git_commit, info.git_dirty) == ("a" * 40, True)
    row = one(store, "SELECT * FROM runs")
    assert row["owner"] == "alice" and row["team"] == "vision" and row["weight_hash"] == "w1"
    assert row["spec_hash"] == expected_spec_hash and row["dataset_hash"] == "p" * 16
    assert row["inputs"] == ["r0", "rx"] and row["git_commit"] == "a" * 40 and row["git_dirty"] is True
    assert row["host"] and row["package_version"] and row["store"] == store.uri
    assert row["tags"] == [] and row["pinned"] is False and row["description"] is None
    assert row["n_bytes"] == os.path.getsize(os.path.join(store.uri, info.files[0].path))
    assert one(store, "SELECT count(*) AS n FROM runs WHERE list_contains(inputs, 'rx')") == {"n": 1}
    with pytest.raises(StoreError, match="inputs must be a list"):
        store.begin_run("capture", inputs="r0")


def test_timings_from_the_driver_and_from_the_records(store):
    with store.begin_run("capture", run_id="plain"):
        pass
    w = store.begin_run("capture", run_id="driven")
    w.commit({"timings": {"wall_s": 12.5, "phases": {"model_load_s": 2.0, "compute_s": 9.0}}})
    plain, driven = store.run("plain"), store.run("driven")
    assert driven.timings["wall_s"] == 12.5 and driven.timings["phases"] == {"model_load_s": 2.0, "compute_s": 9.0}
    from datetime import datetime

    span = (datetime.fromisoformat(plain.committed_at) - datetime.fromisoformat(plain.created_at)).total_seconds()
    assert plain.timings["wall_s"] == pytest.approx(span) and "phases" not in plain.timings
    row = one(store, "SELECT wall_s, timings->>'$.phases.compute_s' AS compute FROM runs WHERE run_id = 'driven'")
    assert row == {"wall_s": 12.5, "compute": "9.0"}


def test_old_format_run_json_still_reads(store):
    """A run written before provenance v2: no owner/team/git/hashes/inputs/annotations."""
    base = os.path.join(store.uri, "runs", "old-1")
    os.makedirs(base)
    old = {"run_id": "old-1", "kind": "capture", "model": "tiny", "weight_hash": None, "spec": {"a": 1},
           "package_version": "0.0.9", "user": "bob", "host": "h", "pid": 1,
           "created_at": "2025-01-02T03:04:05.000000+00:00", "provenance": {}}
    with open(os.path.join(base, "run.json"), "w") as f:
        json.dump(old, f)
    with open(os.path.join(base, "commit.json"), "w") as f:
        json.dump({"run_id": "old-1", "committed_at": "2025-01-02T03:04:07.000000+00:00", "metadata": {}, "files": []}, f)
    info = store.run("old-1")
    assert info.owner == "bob" and info.team is None and info.git_commit is None and info.inputs == ()
    assert info.spec_hash is None and info.dataset_hash is None and info.tags == () and not info.pinned
    assert info.timings["wall_s"] == 2.0
    row = one(store, "SELECT owner, team, git_commit, git_dirty, spec_hash, inputs, tags, pinned, wall_s FROM runs")
    assert row == {"owner": "bob", "team": None, "git_commit": None, "git_dirty": None, "spec_hash": None,
                   "inputs": [], "tags": [], "pinned": False, "wall_s": 2.0}


# -- annotations -------------------------------------------------------------------------------


def test_tags_description_pin_round_trip(store):
    with store.begin_run("capture", run_id="r"):
        pass
    store.tag("r", "ioi", "baseline", "ioi")
    store.untag("r", "baseline")
    store.describe("r", "first try")
    store.describe("r", "IOI residuals, last token")
    store.pin("r")
    info = store.run("r")
    assert info.tags == ("ioi",) and info.description == "IOI residuals, last token" and info.pinned
    assert store.pin("r", False).pinned is False
    # a second writer (another process, another host) appends its own events; nothing is rewritten
    other = open_store(store.uri, create=False)
    other.tag("r", "shared")
    assert set(store.run("r").tags) == {"ioi", "shared"}
    events = os.listdir(os.path.join(store.uri, "runs", "r", "annotations"))
    assert len(events) == 9 and all(e.endswith(".json") for e in events)
    row = one(store, "SELECT tags, description, pinned FROM runs")
    assert sorted(row["tags"]) == ["ioi", "shared"] and row["description"] == "IOI residuals, last token" and not row["pinned"]
    commit = os.path.join(store.uri, "runs", "r", "commit.json")
    assert json.load(open(commit))["files"] == []  # the committed record itself is untouched


def test_annotation_fold_order_and_bad_input(store):
    events = [
        ("b.json", {"op": "tag", "value": "x", "at": "2026-01-01T00:00:01"}),
        ("a.json", {"op": "untag", "value": "x", "at": "2026-01-01T00:00:02"}),
        ("c.json", {"op": "pin", "value": None, "at": "2026-01-01T00:00:00"}),
        ("d.json", {"op": "describe", "value": "late", "at": "2026-01-01T00:00:09"}),
        ("e.json", {"op": "describe", "value": "early", "at": "2026-01-01T00:00:03"}),
    ]
    folded = pv.fold(events)
    assert folded.tags == () and folded.pinned and folded.description == "late"
    with store.begin_run("capture", run_id="r"):
        pass
    for bad in ("", "a,b", "x" * 200, "tab\there"):
        with pytest.raises(StoreError, match="invalid tag"):
            store.tag("r", bad)
    with pytest.raises(StoreError, match="unknown run id"):
        store.tag("nope", "x")


# -- a real job records it all -------------------------------------------------------------------


@pytest.mark.slow
def test_interplab_run_records_provenance(tmp_path, clean_env):
    """``interplab run`` of a tiny capture spec kept in a git repository, with --user/--team."""
    repo = tmp_path / "repo"
    repo.mkdir()
    prompts = ["The cat sat on the mat", "Paris is in France"]
    spec = repo / "capture.yaml"
    spec.write_text(
        "kind: capture\nmodel: tiny-gpt2\ndtype: float32\n"
        f"prompts: {json.dumps(prompts)}\nsites: [resid_post.0]\npositions: [-1]\nbatch_size: 2\n"
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "capture.yaml")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "spec")
    store_dir = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop(pv.USER_ENV, None)
    env.pop(pv.TEAM_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "interplab.jobs", "run", str(spec), "--store", str(store_dir), "--no-progress",
         "--user", "alice", "--team", "vision", "--recompute"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = open_store(str(store_dir), create=False)
    (info,) = store.runs()
    assert info.status == "committed" and info.owner == "alice" and info.team == "vision"
    assert info.git_commit == _git(repo, "rev-parse", "HEAD") and info.git_dirty is False
    assert info.dataset_hash == pv.texts_hash(prompts)
    assert info.spec_hash == pv.spec_hash(info.spec) and info.weight_hash
    phases = info.timings["phases"]
    assert {"start_s", "model_load_s", "compute_s", "finalize_s"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and info.timings["wall_s"] >= phases["compute_s"]
