"""``interplab run`` end to end on an embedded Ray (tiny-llama): a capture job, then a probe job that
reads it (``activations_run``), its views, its provenance, and ``interplab plot``."""

import json
import os
import subprocess
import sys

import pytest

from interplab.jobs.datasets import builtin_records
from interplab.store import open_store

pytestmark = pytest.mark.slow


def interplab(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    return subprocess.run(
        [sys.executable, "-m", "interplab.jobs", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def run_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(line.split(": ", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("run_id: "))


def test_capture_then_probe_through_the_cli(tmp_path):
    store = str(tmp_path / "store")
    (tmp_path / "capture.yaml").write_text(
        "kind: capture\nmodel: tiny-llama\ndataset: {builtin: ioi, limit: 48}\n"
        "sites: [resid_post.0, resid_post.1, resid_post.2]\npositions: [-1]\nstore_dtype: float32\n"
    )
    (tmp_path / "probe.yaml").write_text("kind: probe\nmodel: tiny-llama\ndataset: {builtin: ioi, limit: 48, label: answer}\n")
    capture = run_id(interplab("run", "capture.yaml", "--store", store, "--no-progress", cwd=tmp_path))
    probe = run_id(
        interplab("run", "probe.yaml", "--set", f"activations_run={capture}", "--store", store, "--no-progress", cwd=tmp_path)
    )

    opened = open_store(store)
    info = opened.run(probe)
    assert info.kind == "probe" and info.status == "committed" and info.provenance["inputs"] == [capture]
    # the capture run is the probe run's input: the runs view lists it, and retention keeps it
    listed = opened.sql("SELECT inputs FROM runs WHERE run_id = $r", {"r": probe}).to_pylist()
    assert [list(r["inputs"]) for r in listed] == [[capture]]
    gc = interplab("runs", "gc", "--kind", "capture", "--older-than", "0", "--format", "json", "--store", store, cwd=tmp_path)
    assert gc.returncode == 0, gc.stdout + gc.stderr
    actions = {
        r["run_id"]: r["action"] for r in json.loads(next(line for line in gc.stdout.splitlines() if line.startswith("[")))
    }
    assert actions == {capture: f"keep (an input of {probe})"}
    rows = opened.sql(
        "SELECT layer, n_classes, n_train + n_test AS n FROM probes WHERE run_id = $r ORDER BY layer", {"r": probe}
    ).to_pylist()
    answers = {record["answer"].strip() for record in builtin_records("ioi")[:48]}
    assert rows == [{"layer": layer, "n_classes": len(answers), "n": 48} for layer in range(3)]
    weights = opened.sql("SELECT DISTINCT class FROM probe_weights WHERE run_id = $r", {"r": probe}).to_pylist()
    assert {w["class"] for w in weights} == answers

    plot = interplab("plot", probe, "--store", store, "-o", str(tmp_path / "probes.png"), cwd=tmp_path)
    assert plot.returncode == 0, plot.stdout + plot.stderr
    assert (tmp_path / "probes.png").read_bytes()[:4] == b"\x89PNG"
