"""Job kinds as plugins: ``interplab.kinds`` entry points bring a kind's spec, runner, views and plot.

``plugins/example_kind`` is a separate pip package (its own pyproject.toml and entry point), installed
offline into a temporary folder; the ``interplab`` CLI then validates, runs, queries and plots its
kind with that folder on PYTHONPATH. ``plugins/broken_kind`` declares two kinds that cannot load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from interplab.jobs import KindLoadError, get_kind, kind_names
from interplab.jobs.kinds import KINDS_GROUP, entry_point_kinds
from interplab.jobs.spec import load_spec_file

from .conftest import JOBS_DIR, PLUGINS, interplab, job_env, run_id_of

BUILTIN = {"capture": None, "patching": "patching", "circuit": "circuits", "grafting": "grafting"}


def pip_install(name: str, tmp_path: Path) -> Path:
    """Install ``plugins/<name>`` (offline, from a copy so the tree stays clean) into its own folder."""
    source = tmp_path / "src" / name
    shutil.copytree(PLUGINS / name, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_builtin_kinds_are_entry_points_that_load():
    assert set(BUILTIN) <= set(entry_point_kinds()), f"reinstall interplab (pip install -e .) to refresh {KINDS_GROUP}"
    for name, folder in BUILTIN.items():
        kind = get_kind(name)
        assert kind.name == name
        assert (kind.plot is not None) == (folder is not None), name
    shipped = {load_spec_file(path)["kind"] for path in JOBS_DIR.glob("*.yaml")}
    assert shipped <= set(kind_names())


def test_plot_is_found_through_the_runs_kind(cli, tmp_path):
    """``interplab plot`` asks the run's kind: a patching run draws its heatmap; capture has no plot;
    a kind that is not installed here is named."""
    import pyarrow as pa

    from interplab.store import open_store

    store = open_store(str(tmp_path / "store"))
    with store.begin_run("patching", model="tiny", spec={}) as run:
        run.write_table("patching", pa.table({
            "sweep": ["resid_pre"] * 4, "method": ["exact"] * 4, "layer": [0, 0, 1, 1], "position": [0, 1, 0, 1],
            "head": pa.array([None] * 4, pa.int32()), "value": [0.1, 0.2, 0.3, 0.4], "normalized": [0.0, 0.5, 0.5, 1.0],
        }), chunk="resid_pre")
        run.write_table("prompts", pa.table({"prompt_id": [0], "n_tokens": [2], "token_ids": [[5, 6]], "tokens": [["a", "b"]]}),
                        chunk="prompts")
    with store.begin_run("capture", model="tiny", spec={}) as capture:
        pass
    with store.begin_run("someone_elses", model="tiny", spec={}) as other:
        pass
    out = tmp_path / "heat.svg"
    result = cli("plot", run.run_id, "-o", str(out), "--store", str(tmp_path / "store"))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and "resid_pre (exact)" in out.read_text()
    result = cli("plot", capture.run_id, "-o", str(out), "--store", str(tmp_path / "store"))
    assert result.exit_code == 2 and "'capture' run, and that kind registers no plot" in result.stderr
    result = cli("plot", other.run_id, "-o", str(out), "--store", str(tmp_path / "store"))
    assert result.exit_code == 2 and "'someone_elses' run, a kind not installed here" in result.stderr


def test_missing_extra_kind_module_fails_loudly(monkeypatch):
    monkeypatch.setenv("INTERPLAB_JOB_KINDS", "interplab_no_such_kinds_module")
    with pytest.raises(KindLoadError) as info:
        kind_names()
    message = str(info.value)
    assert "interplab_no_such_kinds_module" in message and "$INTERPLAB_JOB_KINDS" in message
    assert "ModuleNotFoundError" in message


def test_broken_plugins_fail_loudly_naming_the_plugin(tmp_path):
    site = pip_install("broken_kind", tmp_path)
    env = job_env(PYTHONPATH=str(site))
    store = tmp_path / "store"
    cases = {
        "broken": ("'broken = interplab_broken_kind'", "ModuleNotFoundError", "interplab_frobnicator"),
        "vanished": ("'vanished = interplab_vanished_kind'", "ModuleNotFoundError", "interplab_vanished_kind"),
    }
    for kind, fragments in cases.items():
        spec = tmp_path / f"{kind}.yaml"
        spec.write_text(f"kind: {kind}\nmodel: tiny-llama\n")
        proc = interplab("validate", str(spec), "--set", f"store={store}", env=env, timeout=120)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        for fragment in (f"job kind {kind!r}", KINDS_GROUP, "interplab-broken-kind", *fragments):
            assert fragment in errors[0], (fragment, errors[0])
    assert not store.exists()  # validate writes nothing
    # the store cannot tell which views a vanished kind had: reading fails too, naming it
    from interplab.store import open_store

    open_store(str(store)).close()
    proc = interplab("sql", "SELECT 1 AS x", "--store", str(store), env=env, timeout=120)
    assert proc.returncode == 2 and "'vanished'" in proc.stderr and "interplab_vanished_kind" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_plugin_kind_validates_runs_queries_and_plots(tmp_path):
    """The example package's kind on an embedded Ray (its workers get PYTHONPATH from the driver)."""
    site = pip_install("example_kind", tmp_path)
    env = job_env(PYTHONPATH=str(site))
    store = str(tmp_path / "store")
    spec = tmp_path / "example.yaml"
    spec.write_text("kind: example\nmodel: tiny-llama\nwords: [alpha, beta, gamma]\nchunk_size: 2\n"
                    "resources: {num_cpus: 0.5}\n")

    proc = interplab("validate", str(spec), "--set", f"store={store}", env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is a valid example job" in proc.stdout and "2 chunk(s)" in proc.stdout

    proc = interplab("run", str(spec), "--store", store, "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = run_id_of(proc.stdout)
    assert f"committed run {run_id}" in proc.stdout and "3 words counted" in proc.stdout

    proc = interplab("sql", f"SELECT * FROM example_words WHERE run_id = '{run_id}' ORDER BY word_index",
                     "--store", store, "--format", "json", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [list(r) for r in got] == [["run_id", "word_index", "word", "n_tokens"]] * 3  # the plugin's view file
    assert [(r["word_index"], r["word"]) for r in got] == [(0, "alpha"), (1, "beta"), (2, "gamma")]
    assert all(isinstance(r["n_tokens"], int) and r["n_tokens"] >= 1 for r in got)

    out = tmp_path / "words.png"
    proc = interplab("plot", run_id, "-o", str(out), "--store", store, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout and out.stat().st_size > 0
