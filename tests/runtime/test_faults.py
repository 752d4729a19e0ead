"""Stage actors killed mid-job: the job finishes with the same results and the store holds each row once.
Errors inside stages keep their class and are chained to a StageError naming the stage, its layers and the prompts."""

from __future__ import annotations

import os
import signal
import threading
import traceback

import numpy as np
import pytest
import torch

from interplab import load_model
from interplab.analyses.patching import Sweep, activation_patching
from interplab.analyses.tasks import PairSet, ioi_pairs
from interplab.engine import Intervention, InterventionError
from interplab.runtime import ParallelConfig, StageError
from interplab.runtime.pipeline import PipelineModel
from interplab.store import open_store
from tests.runtime.helpers import CLEAN, CORRUPT, logit_diff, resid_sweep

pytestmark = pytest.mark.slow

SITES = ["embed", "resid_pre.1", "z.1", "mlp_post.2", "resid_post.2"]
PROMPTS = [f"{a} and {b} went to the {c}" for a in ("Mary", "John", "Tom") for b in ("Alice", "Bob") for c in ("store", "park", "city", "house")]


@pytest.fixture
def fresh_pipeline(ray_cluster):
    pipe = PipelineModel("tiny-llama", ParallelConfig(stages=2, max_retries=5))
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference_capture(tmp_path_factory):
    """The single-process capture of PROMPTS (chunks of 2) in its own store."""
    store = open_store(str(tmp_path_factory.mktemp("ref") / "store"))
    model = load_model("tiny-llama")
    writer = store.begin_run("capture", model=model.name)
    model.capture(PROMPTS, SITES, writer, batch_size=2, dtype="float32")
    writer.commit()
    return store, writer.run_id


def _check_store(store, run_id, reference):
    ref_store, ref_run = reference
    dupes = store.sql(
        "SELECT site, layer, head, prompt_id, position, count(*) AS n FROM activations "
        "GROUP BY ALL HAVING count(*) > 1"
    )
    assert dupes.num_rows == 0, dupes.to_pylist()[:5]
    for site in SITES:
        got, got_index = store.export(run_id, site, with_index=True)
        want, want_index = ref_store.export(ref_run, site, with_index=True)
        for key in want_index:
            np.testing.assert_array_equal(got_index[key], want_index[key])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    prompts = store.sql("SELECT prompt_id, count(*) AS n FROM prompts GROUP BY prompt_id ORDER BY prompt_id").to_pylist()
    assert [p["prompt_id"] for p in prompts] == list(range(len(PROMPTS))) and all(p["n"] == 1 for p in prompts)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_capture_survives_a_killed_stage(fresh_pipeline, reference_capture, tmp_path, how):
    pipe = fresh_pipeline
    victim = 1 if how == "ray.kill" else 0
    before = pipe.stage_pids()
    store = open_store(str(tmp_path / "store"))
    writer = store.begin_run("capture", model=pipe.name)

    def on_chunk(index):
        if index == 2:  # chunks 3.. are in flight on both stages
            if how == "ray.kill":
                import ray

                ray.kill(pipe.stage_actor(victim), no_restart=False)
            else:
                os.kill(before[victim], signal.SIGKILL)

    n = pipe.capture(PROMPTS, SITES, writer, batch_size=2, dtype="float32", on_chunk=on_chunk)
    writer.commit()
    assert n == len(PROMPTS) // 2
    after = pipe.stage_pids()
    assert after[victim] != before[victim] and after[1 - victim] == before[1 - victim]
    _check_store(store, writer.run_id, reference_capture)


def test_sweep_survives_a_killed_stage(fresh_pipeline):
    pipe = fresh_pipeline
    ref = load_model("tiny-llama")
    want = resid_sweep(ref, CLEAN, CORRUPT, range(3))
    before = pipe.stage_pids()
    killer = threading.Timer(0.3, os.kill, (before[1], signal.SIGKILL))
    killer.start()
    try:
        results = [resid_sweep(pipe, CLEAN, CORRUPT, range(3)) for _ in range(8)]
    finally:
        killer.cancel()
    assert pipe.stage_pids()[1] != before[1], "the stage was not killed during the sweep"
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patching_survives_a_killed_stage(fresh_pipeline):
    """The patching driver's mid-model passes (rows joining at their layer, cached prefixes) are
    resubmitted when a stage dies: the sweep's values equal the single-process engine's."""
    pipe = fresh_pipeline
    ref = load_model("tiny-llama")
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 4, seed=2))
    want = activation_patching(ref, pairs, [Sweep("resid_pre")], batch_rows=8).values("resid_pre")
    before = pipe.stage_pids()
    killer = threading.Timer(0.5, os.kill, (before[1], signal.SIGKILL))
    killer.start()
    try:
        results = [activation_patching(pipe, pairs, [Sweep("resid_pre")], batch_rows=8).values("resid_pre") for _ in range(4)]
    finally:
        killer.cancel()
    assert pipe.stage_pids()[1] != before[1], "the stage was not killed during the sweep"
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_replicas_pull_from_one_queue(ray_cluster, reference_capture, tmp_path):
    with PipelineModel("tiny-llama", ParallelConfig(stages=2, replicas=2, micro_batches=4)) as pipe:
        store = open_store(str(tmp_path / "store"))
        writer = store.begin_run("capture", model=pipe.name)
        pipe.capture(PROMPTS, SITES, writer, batch_size=2, dtype="float32")
        writer.commit()
        _check_store(store, writer.run_id, reference_capture)
        ref = load_model("tiny-llama")
        torch.testing.assert_close(resid_sweep(pipe, CLEAN, CORRUPT, [1]), resid_sweep(ref, CLEAN, CORRUPT, [1]), rtol=1e-5, atol=1e-5)


def _failing_metric(logits, batch):
    raise ZeroDivisionError("metric exploded")


def test_errors_keep_their_class_and_name_stage_layers_and_prompts(pipelines):
    pipe = pipelines.get("tiny-llama", stages=2, micro_batches=2)
    bad = Intervention("resid_pre.2", "set", value=torch.ones(7), rows=[2])  # d_model is 64
    with pytest.raises(InterventionError, match="does not fit") as info:
        pipe.run(CLEAN * 2, interventions=[bad])
    where = info.value.__cause__
    assert isinstance(where, StageError)
    assert (where.stage, where.layers, where.prompt_ids) == (1, (2, 3), [2, 3])  # micro-batch 1: rows 2-3
    assert where.cause_type == "InterventionError" and "Traceback" in where.remote_traceback
    assert "interventions.py" in where.remote_traceback  # the actor's own frames
    shown = "".join(traceback.format_exception(info.value))  # what the user sees: no Ray wrapping
    assert "RayTaskError" not in shown and "During handling" not in shown
    assert "stage 1 (layers 2..2) on prompts [2, 3]" in shown
    with pytest.raises(ZeroDivisionError, match="metric exploded") as info:
        pipe.gradients(CLEAN * 2, _failing_metric, ["resid_pre.1"])
    assert str(info.value.__cause__).startswith("stage 1 (layers 2..2) on prompts [0, 1, 2, 3] failed: ZeroDivisionError: metric exploded")
    # the pipeline is still usable afterwards
    got = pipe.gradients(CLEAN, logit_diff, ["resid_pre.1"], logits="last")
    want = load_model("tiny-llama").gradients(CLEAN, logit_diff, ["resid_pre.1"], logits="last")
    torch.testing.assert_close(got.grads["resid_pre.1"], want.grads["resid_pre.1"], rtol=1e-5, atol=1e-5)
