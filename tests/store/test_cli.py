"""``interplab sql`` / ``interplab runs``: output formats and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.store.conftest import make_rows, write_site


@pytest.fixture
def filled(store):
    with store.begin_run("capture", model="tiny", spec={}, run_id="run-a") as w:
        write_site(w, 0, "resid_pre", 3, make_rows(8, 4), dtype="float32")
    failed = store.begin_run("capture", model="tiny", spec={}, run_id="run-b")
    failed.fail("oom")
    return store


def test_sql_formats(filled, cli):
    uri = filled.uri
    out = cli("sql", "--store", uri, "--format", "json", "SELECT run_id, count(*) AS n FROM activations GROUP BY run_id")
    assert out.exit_code == 0 and json.loads(out.stdout) == [{"run_id": "run-a", "n": 8}]
    out = cli("sql", "--store", uri, "--format", "csv", "SELECT prompt_id, act FROM activations ORDER BY prompt_id, position LIMIT 1")
    header, row = out.stdout.strip().splitlines()
    assert header == "prompt_id,act" and row.startswith('0,"[')
    out = cli("sql", "--store", uri, "SELECT status, count(*) AS n FROM runs GROUP BY status ORDER BY status")
    assert "committed" in out.stdout and "(2 rows)" in out.stdout
    out = cli("sql", "--store", uri, "--format", "json", "--saved", "top_tokens_neuron",
              "--param", "run_id=run-a", "--param", "site=resid_pre", "--param", "layer=3",
              "--param", "neuron=0", "--param", "k=2")
    assert out.exit_code == 0 and len(json.loads(out.stdout)) == 2


def test_env_var_store(filled, cli, monkeypatch):
    monkeypatch.setenv("INTERPLAB_STORE", filled.uri)
    out = cli("sql", "--format", "json", "SELECT count(*) AS n FROM runs")
    assert json.loads(out.stdout) == [{"n": 2}]


def test_runs_commands(filled, cli):
    out = cli("runs", "--store", filled.uri)
    assert "run-a" in out.stdout and "failed" in out.stdout
    out = cli("runs", "list", "--store", filled.uri, "--status", "failed", "--format", "json")
    assert [r["run_id"] for r in json.loads(out.stdout)] == ["run-b"]
    shown = json.loads(cli("runs", "show", "run-a", "--store", filled.uri).stdout)
    assert shown["status"] == "committed" and shown["sites"] == ["resid_pre.3"] and shown["rows"] == {"activations": 8}
    assert "failed_runs_cleaned" in cli("runs", "gc", "--store", filled.uri).stdout
    assert cli("runs", "delete", "run-a", "--yes", "--store", filled.uri).exit_code == 0
    assert json.loads(cli("sql", "--store", filled.uri, "--format", "json", "SELECT count(*) AS n FROM activations").stdout) == [{"n": 0}]


@pytest.mark.parametrize(
    "args, message",
    [
        (["sql", "SELEC 1"], "malformed SQL"),
        (["sql", "COPY runs TO '/tmp/x.csv'"], "only SELECT"),
        (["sql", "SELECT * FROM '/etc/passwd'"], "file path"),
        (["runs", "show", "no-such-run"], "unknown run id"),
        (["runs", "delete", "no-such-run", "--yes"], "unknown run id"),
        (["sql", "--saved", "no_such_query"], "unknown saved query"),
        (["sql", "--saved", "patching_heatmap", "--param", "run_id=run-a"], "needs parameter 'sweep'"),
        (["sql", "--saved", "patching_heatmap", "--param", "run_id=run-a", "--param", "sweep=s", "--param", "bogus=1"], "no parameter 'bogus'"),
        (["sql", "--saved", "top_tokens_neuron", "--param", "run_id=a", "--param", "site=s", "--param", "layer=x", "--param", "neuron=0"], "must be INTEGER"),
        (["sql"], "give either a QUERY or --saved"),
    ],
)
def test_bad_input_exits_2_with_one_line(filled, cli, args, message):
    out = cli(*args, "--store", filled.uri)
    assert out.exit_code == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_not_a_store_exits_2(tmp_path, cli):
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path, tmp_path / "missing", tmp_path / "file.txt"):
        out = cli("sql", "--store", str(path), "SELECT 1")
        assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_real_process_exit_code(filled):
    """The same path through a real interpreter: exit status 2, one line, no traceback."""
    code = (
        "import click, sys; from interplab.cli import store_cmds\n"
        "g = click.Group('interplab'); store_cmds.register(g); g(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "sql", "--store", filled.uri, "DROP VIEW runs"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
