"""Placing a pipeline's stage bundles: fail at once when the cluster can never hold them, say what is
awaited while they wait, give up after the timeout, and really spread stages over nodes.

The multi-node tests simulate a cluster on this machine with ``ray.cluster_utils.Cluster`` (one
CPU per node). Each runs in a subprocess of its own (``python -c "...; scenario(NAME)"``) that starts
its nodes, prints one JSON line of what it saw and stops them: a ``Cluster`` resets process-wide
Ray state when it shuts down, so it must not share a process with the session's local Ray
(``tests/runtime/conftest.py``). The tests then assert on that JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interplab.runtime import cluster
from interplab.runtime.cluster import NodeResources, PlacementError

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "tests" / "jobs" / "plugins"  # the test job kinds (flaky), for the simulated nodes' workers
PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The city of Paris is in"]
SITES = ["resid_pre.0", "resid_post.1", "z.2", "resid_post.2"]
TOL = 1e-5


# -- no Ray: the packing arithmetic and the messages ----------------------------------------------


def test_bundles_fit_counts_whole_bundles_per_node():
    one = {"CPU": 1.0}
    assert cluster.bundles_fit(one, 3, [{"CPU": 1}, {"CPU": 1}, {"CPU": 1}])
    assert not cluster.bundles_fit(one, 3, [{"CPU": 1}, {"CPU": 0.9}, {"CPU": 1}])  # a bundle lies on one node
    assert cluster.bundles_fit(one, 2, [{"CPU": 2.5}])
    assert not cluster.bundles_fit({"CPU": 1, "GPU": 1}, 2, [{"CPU": 8, "GPU": 1}, {"CPU": 8}])
    assert cluster.bundles_fit({"CPU": 0.1, "GPU": 0.0}, 10, [{"CPU": 1.0}])  # ten tenths, no GPU needed
    assert not cluster.bundles_fit(one, 1, [])


def test_never_placeable_fails_at_once_naming_bundles_and_nodes(monkeypatch):
    monkeypatch.setattr(cluster, "can_autoscale", lambda: False)
    nodes = [NodeResources("a" * 56, {"CPU": 1.0}, {"CPU": 0.9}, {"CPU": 0.1})]
    nodes += [NodeResources(c * 56, {"CPU": 1.0}, {"CPU": 1.0}) for c in "bc"]
    with pytest.raises(PlacementError) as info:
        cluster.check_placeable(0, {"CPU": 1.0}, 3, nodes)
    message = str(info.value)
    assert "can never place" in message and "no autoscaler" in message
    assert "3 bundle(s) of {CPU: 1} wanted; 3 node(s): aaaaaaaa CPU 1 total, 0.9 free ({CPU: 0.1} held by this job)" in message
    assert "bbbbbbbb CPU 1 total, 1 free" in message
    cluster.check_placeable(0, {"CPU": 1.0}, 2, nodes)  # two fit on b and c: not refused
    monkeypatch.setattr(cluster, "can_autoscale", lambda: True)
    cluster.check_placeable(0, {"CPU": 1.0}, 3, nodes)  # an autoscaler may add nodes: wait instead


def test_can_autoscale_reads_the_autoscalers_cluster_config(monkeypatch):
    from ray._private import state
    from ray.core.generated import autoscaler_pb2

    def config(*groups):
        return autoscaler_pb2.ClusterConfig(node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name=f"g{i}", resources={"CPU": 4}, min_count=lo, max_count=hi)
            for i, (lo, hi) in enumerate(groups)
        ])

    for reported, scales in ((None, False), (config((1, 1)), False), (config((1, 1), (0, 5)), True), (config((0, -1)), True)):
        monkeypatch.setattr(state.state, "get_cluster_config", lambda reported=reported: reported)
        assert cluster.can_autoscale() is scales, reported


def test_placement_timeout_is_a_parallel_setting():
    from interplab.runtime import ParallelConfig

    assert ParallelConfig().placement_timeout_s == cluster.DEFAULT_PLACEMENT_TIMEOUT_S == 600
    assert ParallelConfig(placement_timeout_s=30).placement_timeout_s == 30
    with pytest.raises(ValueError, match="placement_timeout_s"):
        ParallelConfig(placement_timeout_s=0)


# -- simulated multi-node clusters (subprocesses) -------------------------------------------------


def run_scenario(name: str, tmp_path: Path, timeout: float = 900) -> dict:
    """Run ``scenario(name)`` in its own process group; returns the JSON it printed last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(PLUGINS)})
    code = f"from tests.runtime.test_placement import scenario; scenario({name!r}, {str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"scenario {name} did not finish in {timeout:g} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the scenario's nodes left behind
        except ProcessLookupError:
            pass
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"scenario {name} failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_stages_spread_over_two_nodes_and_equal_the_single_process_model(tmp_path):
    seen = run_scenario("two_nodes", tmp_path)
    assert seen["alive_nodes"] == 2
    assert len(seen["stage_nodes"]) == 2 and len(set(seen["stage_nodes"])) == 2, seen["stage_nodes"]  # one stage per node
    assert seen["logits_diff"] <= TOL, seen
    for site in SITES:
        assert seen["capture_diff"][site] <= TOL, (site, seen["capture_diff"])
    # three bundles of one CPU on two one-CPU nodes: refused before any placement group exists
    assert "can never place" in seen["never"] and "3 bundle(s) of {CPU: 1} wanted; 2 node(s)" in seen["never"]
    # two bundles that would fit, with one node held by another actor: a warning, then the timeout
    assert f"not placed within {seen['busy_timeout_s']:g} s (parallel.placement_timeout_s)" in seen["busy"]
    assert "2 bundle(s) of {CPU: 1} wanted; 2 node(s)" in seen["busy"] and "0 free" in seen["busy"]
    assert any("waiting for the cluster to place its stages" in w for w in seen["busy_warnings"]), seen["busy_warnings"]
    assert seen["groups_after"] == [], "a refused or timed-out placement group was left reserved"


@pytest.mark.slow
def test_job_says_what_it_waits_for_and_fails_fast_when_the_cluster_can_never_place_it(tmp_path):
    """The reported case: three one-CPU nodes, ``stages: 3, cpus_per_stage: 1``, the job's own worker
    on 0.1 CPU of one of them — three whole CPUs can never be free at once. Then a job that fits but
    finds a node busy: it says so within seconds, and runs once the node is free (no clock involved:
    the node is freed when that line has been read)."""
    seen = run_scenario("job_on_three_nodes", tmp_path)
    never = seen["never"]
    assert never["rc"] == 1, never
    assert "can never place its stages" in never["stderr"] and "no autoscaler" in never["stderr"], never["stderr"]
    assert "3 bundle(s) of {CPU: 1} wanted; 3 node(s)" in never["stderr"]
    assert "({CPU: 0.1} held by this job)" in never["stderr"]  # the job's own worker is counted
    assert not never["store_written"]  # a job that cannot start leaves nothing
    busy = seen["busy"]
    assert busy["waiting_line"], busy
    assert "replica-0: waiting for the cluster to place its stages: 2 bundle(s) of {CPU: 1} wanted; 3 node(s)" in busy["waiting_line"]
    assert "total" in busy["waiting_line"] and "free" in busy["waiting_line"]
    assert busy["rc"] == 0, busy
    assert "committed run" in busy["stdout"]
    # a retried attempt places its stages again: the failed attempt's group was released with its worker
    retried = seen["retried"]
    assert retried["rc"] == 0, retried
    assert "attempt 1 failed" in retried["stdout"] and "injected failure in c1" in retried["stdout"]
    assert "committed run" in retried["stdout"], retried


# -- the scenarios (run by run_scenario in a subprocess; not tests) --------------------------------


def scenario(name: str, tmp: str) -> None:
    result = {"two_nodes": _two_nodes, "job_on_three_nodes": _job_on_three_nodes}[name](Path(tmp))
    print(json.dumps(result), flush=True)


scenario.__test__ = False


def _start_nodes(n: int):
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(n - 1):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    return nodes


def _hog():
    """An actor holding one whole CPU (a class defined here travels to the workers by value)."""
    import ray

    class Hog:
        def ready(self) -> bool:
            return True

    hog = ray.remote(num_cpus=1)(Hog).remote()
    ray.get(hog.ready.remote())
    return hog


def _two_nodes(tmp: Path) -> dict:
    import logging

    import ray

    from interplab import load_model
    from interplab.runtime import ParallelConfig
    from interplab.runtime.pipeline import PipelineModel
    from ray._private import state

    nodes = _start_nodes(2)
    out: dict = {}
    try:
        ray.init(address=nodes.address, logging_level="error", log_to_driver=False)
        out["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        pipe = PipelineModel("tiny-llama", ParallelConfig(stages=2, cpus_per_stage=1))
        try:
            job = ray.get_runtime_context().get_job_id()
            actors = [a for a in state.actors().values() if a["State"] == "ALIVE" and a["JobID"] == job]
            out["stage_nodes"] = [a["Address"]["NodeID"] for a in actors]
            got = pipe.run(PROMPTS, capture=SITES)
        finally:
            pipe.close()
        want = load_model("tiny-llama").run(PROMPTS, capture=SITES)
        out["logits_diff"] = float((got.logits - want.logits).abs().max())
        out["capture_diff"] = {s: float((got.cache[s] - want.cache[s]).abs().max()) for s in SITES}
        try:
            cluster.place_bundles(0, {"CPU": 1.0}, 3, timeout_s=600)
            out["never"] = "placed"
        except PlacementError as exc:
            out["never"] = str(exc)
        hog = _hog()
        warnings: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        cluster.log.addHandler(Keep())
        out["busy_timeout_s"] = cluster.REPORT_AFTER_S + 2
        try:
            cluster.place_bundles(0, {"CPU": 1.0}, 2, timeout_s=out["busy_timeout_s"])
            out["busy"] = "placed"
        except PlacementError as exc:
            out["busy"] = str(exc)
        out["busy_warnings"] = warnings
        ray.kill(hog)
        out["groups_after"] = [g["name"] for g in ray.util.placement_group_table().values()
                               if g["state"] != "REMOVED" and g["name"].startswith(cluster.PLACEMENT_PREFIX)]
    finally:
        ray.shutdown()
        nodes.shutdown()
    return out


def _job_on_three_nodes(tmp: Path) -> dict:
    import ray

    nodes = _start_nodes(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_ADDRESS": nodes.address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    spec = ("kind: capture\nmodel: tiny-llama\nprompts: {prompts}\nsites: [resid_pre.0, resid_post.2]\n"
            "parallel: {{stages: {stages}, cpus_per_stage: 1}}\nresources: {{num_cpus: 0.1}}\nretries: 0\n")
    out: dict = {}
    try:
        never = tmp / "never.yaml"
        never.write_text(spec.format(prompts=json.dumps(PROMPTS), stages=3))
        proc = subprocess.run([sys.executable, "-m", "interplab.jobs", "run", str(never), "--store", str(tmp / "never-store"),
                               "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out["never"] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                        "store_written": (tmp / "never-store").exists()}

        ray.init(address=nodes.address, logging_level="error", log_to_driver=False)
        hog = _hog()
        busy = tmp / "busy.yaml"
        busy.write_text(spec.format(prompts=json.dumps(PROMPTS), stages=2))
        with open(tmp / "busy.stderr", "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "interplab.jobs", "run", str(busy), "--store",
                                     str(tmp / "busy-store"), "--no-progress"], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)
            seen, waiting = [], ""
            for line in proc.stdout:  # until the job says what it waits for (or ends)
                seen.append(line)
                if "still waiting" in line:
                    waiting = line
                    break
            ray.kill(hog)  # now the second node is free: the stages can be placed
            rest, _ = proc.communicate(timeout=600)
        out["busy"] = {"rc": proc.returncode, "stdout": "".join(seen) + rest, "waiting_line": waiting,
                       "stderr": (tmp / "busy.stderr").read_text()[-3000:]}

        # stages on two of the three nodes, the worker on the third: room for one set of stages only
        state = tmp / "flaky-state"
        state.mkdir()
        retried = tmp / "retried.yaml"
        retried.write_text(f"kind: flaky\nn_chunks: 3\nfail_once: [c1]\nstate_dir: {state}\nretries: 1\n"
                           "parallel: {stages: 2, cpus_per_stage: 1}\nresources: {num_cpus: 0.1}\n")
        proc = subprocess.run([sys.executable, "-m", "interplab.jobs", "run", str(retried), "--store",
                               str(tmp / "retried-store"), "--no-progress"], cwd=REPO,
                              env={**env, "INTERPLAB_JOB_KINDS": "interplab_test_kinds"}, capture_output=True,
                              text=True, timeout=600)
        out["retried"] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-3000:]}
    finally:
        ray.shutdown()
        nodes.shutdown()
    return out
