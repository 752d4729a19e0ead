"""``interplab runs``: every filter, ``show``, and the tag / describe / pin commands."""

from __future__ import annotations

import json
import os

import pytest

from tests.store.conftest import make_rows, write_site


def backdate(store, run_id: str, created_at: str) -> None:
    """Rewrite a run's creation time (a test fixture: real runs are never rewritten)."""
    path = os.path.join(store.uri, "runs", run_id, "run.json")
    with open(path) as f:
        record = json.load(f)
    record["created_at"] = created_at
    with open(path, "w") as f:
        json.dump(record, f)


@pytest.fixture
def many(store):
    runs = [  # run_id, kind, model, owner, team, created
        ("r1", "capture", "gpt2", "alice", "vision", "2026-01-10T09:00:00+00:00"),
        ("r2", "capture", "smollm2", "bob", "vision", "2026-02-01T00:00:00+00:00"),
        ("r3", "patching", "gpt2", "alice", "nlp", "2026-02-01T23:59:00+00:00"),
        ("r4", "circuits", "gpt2", "carol", "nlp", "2026-03-15T12:00:00+00:00"),
    ]
    for run_id, kind, model, owner, team, created in runs:
        w = store.begin_run(kind, model=model, run_id=run_id, owner=owner, team=team)
        if run_id == "r4":
            w.fail("boom")
        else:
            if kind == "capture":
                write_site(w, 0, "resid_pre", 2, make_rows(4, 4))
            w.commit()
        backdate(store, run_id, created)
    store.tag("r1", "ioi", "baseline")
    store.tag("r3", "ioi")
    return open_store_fresh(store)


def open_store_fresh(store):
    from interplab.store import open_store

    return open_store(store.uri, create=False)


def listed(cli, store, *args: str) -> list[str]:
    out = cli("runs", "list", "--store", store.uri, "--format", "json", *args)
    assert out.exit_code == 0, out.output
    return [r["run_id"] for r in json.loads(out.stdout)]


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), ["r1", "r2", "r3", "r4"]),
        (("--owner", "alice"), ["r1", "r3"]),
        (("--team", "nlp"), ["r3", "r4"]),
        (("--kind", "capture"), ["r1", "r2"]),
        (("--model", "gpt2"), ["r1", "r3", "r4"]),
        (("--tag", "ioi"), ["r1", "r3"]),
        (("--tag", "ioi", "--tag", "baseline"), ["r1"]),
        (("--status", "failed"), ["r4"]),
        (("--since", "2026-02-01"), ["r2", "r3", "r4"]),
        (("--until", "2026-02-01"), ["r1", "r2", "r3"]),  # a bare date includes the whole day
        (("--until", "2026-02-01T12:00:00"), ["r1", "r2"]),
        (("--since", "2026-01-11", "--until", "2026-03-01", "--owner", "alice"), ["r3"]),
        (("--owner", "nobody"), []),
    ],
)
def test_every_filter(many, cli, args, expected):
    assert listed(cli, many, *args) == expected


def test_filters_on_the_group_itself(many, cli):
    out = cli("runs", "--store", many.uri, "--owner", "alice", "--format", "json")
    assert [r["run_id"] for r in json.loads(out.stdout)] == ["r1", "r3"]
    out = cli("runs", "--store", many.uri, "--team", "vision")
    assert "r1" in out.stdout and "r2" in out.stdout and "r3" not in out.stdout and "(2 rows)" in out.stdout


def test_bad_date_exits_2(many, cli):
    out = cli("runs", "list", "--store", many.uri, "--since", "last week")
    assert out.exit_code == 2 and out.stderr.strip().startswith("error: --since 'last week'")


def test_show_prints_the_full_provenance(many, cli):
    shown = json.loads(cli("runs", "show", "r1", "--store", many.uri).stdout)
    for key in ("owner", "team", "host", "package_version", "git_commit", "git_dirty", "weight_hash", "spec_hash",
                "dataset_hash", "inputs", "timings", "tags", "description", "pinned", "store", "spec", "provenance"):
        assert key in shown, key
    assert shown["owner"] == "alice" and shown["team"] == "vision" and shown["tags"] == ["ioi", "baseline"]
    assert shown["sites"] == ["resid_pre.2"] and shown["rows"] == {"activations": 4} and shown["store"] == many.uri
    assert shown["timings"]["created_at"] == "2026-01-10T09:00:00+00:00"


def test_tag_describe_pin_round_trip(many, cli):
    uri = many.uri
    assert cli("runs", "tag", "r2", "probe", "final", "--store", uri).exit_code == 0
    assert cli("runs", "tag", "r2", "final", "--remove", "--store", uri).stdout.strip() == "r2: tags [probe]"
    out = cli("runs", "describe", "r2", "SmolLM2 residuals for the probe", "--store", uri)
    assert "description: SmolLM2 residuals for the probe" in out.stdout
    assert "pinned" in cli("runs", "pin", "r2", "--store", uri).stdout
    shown = json.loads(cli("runs", "show", "r2", "--store", uri).stdout)
    assert shown["tags"] == ["probe"] and shown["description"] == "SmolLM2 residuals for the probe" and shown["pinned"]
    cli("runs", "unpin", "r2", "--store", uri)
    assert json.loads(cli("runs", "show", "r2", "--store", uri).stdout)["pinned"] is False
    assert listed(cli, many, "--tag", "probe") == ["r2"]
    out = cli("runs", "tag", "nope", "x", "--store", uri)
    assert out.exit_code == 2 and "unknown run id 'nope'" in out.stderr
    out = cli("runs", "tag", "r2", "a,b", "--store", uri)
    assert out.exit_code == 2 and "invalid tag" in out.stderr


def test_runs_list_imports_no_heavy_library(many):
    """``interplab runs`` in a fresh interpreter lists the runs without importing torch,
    transformers, Ray, DuckDB, pandas, pyarrow or numpy (what it imports is its start-up time)."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from interplab.cli.main import _register, cli\n"
        "_register()\n"
        "try:\n"
        "    cli(['runs', '--store', sys.argv[1], '--format', 'json'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('torch', 'transformers', 'ray', 'duckdb', 'pandas', 'pyarrow', 'numpy')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, many.uri], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["run_id"] for r in json.loads(proc.stdout)] == ["r1", "r2", "r3", "r4"]
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
