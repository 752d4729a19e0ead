"""``interplab run`` on real Ray: every spec in ``jobs/``, retries, plugins, usage errors at run time.

Each spec's first line ``# test-overrides: KEY=VALUE ...`` (or ``none``) says how the tests run it
(tiny models where the spec allows it; ``capture-smollm2.yaml`` runs SmolLM2-135M as is).
"""

from __future__ import annotations

import shlex

import pytest

from interplab.jobs.spec import load_spec_file

from .conftest import JOBS_DIR, interplab, job_env, rows, run_id_of

SPECS = sorted(JOBS_DIR.glob("*.yaml"))


def test_overrides(path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# test-overrides:"), f"{path.name}: first line must be '# test-overrides: ...'"
    text = first[len("# test-overrides:"):].strip()
    return [] if text.startswith("none") else shlex.split(text)


test_overrides.__test__ = False  # a helper, not a test


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_spec_runs_and_commits(path, tmp_path, ray_head):
    """``capture-smollm2.yaml`` on the embedded default (as the README runs it); the others on the
    shared test cluster through ``$RAY_ADDRESS`` (saves a Ray start each)."""
    kind = load_spec_file(path).get("kind")
    store = tmp_path / "store"
    sets = [a for o in test_overrides(path) for a in ("--set", o)]
    env = job_env() if path.name == "capture-smollm2.yaml" else {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    proc = interplab("run", str(path), *sets, "--store", str(store), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = run_id_of(proc.stdout)
    assert f"committed run {run_id}" in proc.stdout
    assert f"interplab sql --store {store}" in proc.stdout  # the SQL to look at the results
    info = rows(str(store), f"SELECT kind, status, spec FROM runs WHERE run_id = '{run_id}'")
    assert info and info[0]["status"] == "committed" and info[0]["kind"] == kind
    # every printed query runs and returns rows
    queries = [line.split('"', 1)[1].rsplit('"', 1)[0] for line in proc.stdout.splitlines() if "interplab sql" in line]
    assert queries
    for query in queries:
        assert rows(str(store), query), query
    if kind == "capture":
        spec = load_spec_file(path)
        counts = rows(str(store), f"SELECT site, layer, count(*) AS n, count(DISTINCT prompt_id) AS p FROM activations "
                                  f"WHERE run_id = '{run_id}' GROUP BY ALL")
        assert len(counts) == len(spec["sites"])
        assert {r["p"] for r in counts} == {spec["dataset"]["limit"]}


def plugin_env(ray_head) -> dict[str, str]:
    """The test kind ``flaky`` (a plugin on the shared cluster's PYTHONPATH) via $INTERPLAB_JOB_KINDS."""
    return {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"], "INTERPLAB_JOB_KINDS": "interplab_test_kinds"}


@pytest.mark.slow
def test_failed_chunk_is_retried_and_only_missing_chunks_rerun(tmp_path, ray_head):
    """A chunk that fails once: with retries the run commits, every other chunk ran exactly once."""
    state = tmp_path / "state"
    state.mkdir()
    spec = tmp_path / "flaky.yaml"
    spec.write_text(f"kind: flaky\nn_chunks: 5\nfail_once: [c3]\nstate_dir: {state}\nretries: 1\n"
                    "resources: {num_cpus: 0.1}\n")
    env = plugin_env(ray_head)
    proc = interplab("run", str(spec), "--store", str(tmp_path / "store"), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attempt 1 failed" in proc.stdout and "injected failure in c3" in proc.stdout
    calls = (state / "calls.log").read_text().split()
    assert sorted(calls) == ["c0", "c1", "c2", "c3", "c4"]  # c3 ran twice, but wrote once; no chunk repeated
    run_id = run_id_of(proc.stdout)
    got = rows(str(tmp_path / "store"), f"SELECT chunk, value FROM flaky WHERE run_id = '{run_id}' ORDER BY chunk")
    assert got == [{"chunk": f"c{i}", "value": i * i} for i in range(5)]


@pytest.mark.slow
def test_failure_without_retries_marks_the_run_failed_then_resume_completes_it(tmp_path, ray_head):
    state = tmp_path / "state"
    state.mkdir()
    spec = tmp_path / "flaky.yaml"
    spec.write_text(f"kind: flaky\nn_chunks: 3\nfail_once: [c1]\nstate_dir: {state}\nretries: 0\n"
                    "resources: {num_cpus: 0.1}\n")
    env = plugin_env(ray_head)
    store = str(tmp_path / "store")
    proc = interplab("run", str(spec), "--store", store, "--no-progress", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "chunk c1 failed: RuntimeError: injected failure in c1" in proc.stderr
    run_id = run_id_of(proc.stdout)
    assert rows(store, f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [{"status": "failed"}]
    assert rows(store, "SELECT count(*) AS n FROM runs WHERE status = 'committed'") == [{"n": 0}]  # nothing visible
    proc = interplab("run", "--resume", run_id, "--store", store, "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(2 computed, 1 already done)" in proc.stdout  # c0 was done; c1 failed, so c2 never started
    assert rows(store, f"SELECT count(*) AS n FROM flaky WHERE run_id = '{run_id}'") == [{"n": 3}]
    again = interplab("run", "--resume", run_id, "--store", store, "--no-progress", env=env)
    assert again.returncode == 0 and "already committed" in again.stdout


def test_resume_and_rerun_usage_errors(cli, tmp_path):
    store = str(tmp_path / "store")
    result = cli("run", "--resume", "capture-nope", "--store", store)
    assert result.exit_code == 2 and "--resume" in result.stderr and "capture-nope" in result.stderr
    result = cli("run", "--rerun", "capture-nope", "--store", store)
    assert result.exit_code == 2
    result = cli("run")
    assert result.exit_code == 2 and "exactly one" in result.stderr
