"""A two-stage Ray pipeline whose stages share the GPU (``gpus_per_stage: 0.5``), object-reference
transport: runs, gradients, patching sweeps, training steps and store captures equal the CPU engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_helpers import CLEAN, CORRUPT, GPUS_PER_STAGE, PROMPTS, TOL, cpu, logit_diff, next_token_loss, sites_of, weight_devices
from interplab import load_model
from interplab.engine import AdamConfig, steer
from interplab.runtime import ParallelConfig
from interplab.runtime.pipeline import PipelineModel

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def pipe(ray_cluster):
    config = ParallelConfig(stages=2, gpus_per_stage=GPUS_PER_STAGE, cpus_per_stage=1, micro_batches=2,
                            transport="refs", placement_timeout_s=60)
    with PipelineModel(MODEL, config) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def ref():
    return load_model(MODEL)


def test_stages_hold_their_weights_on_the_device(pipe):
    import ray

    want = "cuda" if GPUS_PER_STAGE > 0 else "cpu"
    assert [spec.device for spec in pipe.scheduler.specs] == [want, want]
    devices = ray.get([actor.__ray_call__.remote(weight_devices) for actor in pipe.scheduler.replicas[0].actors])
    assert devices == [{want}, {want}]


def test_run_equals_the_cpu_engine(pipe, ref):
    sites = sites_of(ref)
    interventions = [steer("resid_pre.2", torch.full((ref.d_model,), 0.1), 1.5)]
    want = ref.run(PROMPTS, capture=sites, interventions=interventions)
    got = pipe.run(PROMPTS, capture=sites, interventions=interventions)
    torch.testing.assert_close(cpu(got.logits), want.logits, **TOL)
    for site in sites:
        torch.testing.assert_close(cpu(got.cache[site]), want.cache[site], **TOL, msg=lambda m, s=site: f"{s}: {m}")


def test_gradients_equal_the_cpu_engine(pipe, ref):
    sites = ["embed", "resid_pre.1", "z.1", "resid_post.2"]
    want = ref.gradients(PROMPTS, logit_diff, sites, logits="last")
    got = pipe.gradients(PROMPTS, logit_diff, sites, logits="last")
    for site in sites:
        torch.testing.assert_close(cpu(got.grads[site]), want.grads[site], **TOL, msg=lambda m, s=site: f"{s}: {m}")


def test_patching_sweep_equals_the_cpu_engine(pipe, ref):
    from interplab.analyses.patching import Sweep, activation_patching
    from interplab.analyses.tasks import PairSet, ioi_pairs

    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 2, seed=0))
    want = activation_patching(ref, pairs, [Sweep("resid_pre")])
    got = activation_patching(pipe, pairs, [Sweep("resid_pre")])
    torch.testing.assert_close(got.values("resid_pre"), want.values("resid_pre"), **TOL)


def test_capture_into_a_store(pipe, ref, tmp_path):
    from interplab.store import open_store

    store = open_store(str(tmp_path / "store"))
    writer = store.begin_run("capture", model=pipe.name)
    sites = ["resid_pre.0", "resid_post.2"]  # one per stage: each stage writes its own
    prompts = PROMPTS + CORRUPT
    assert pipe.capture(prompts, sites, writer, batch_size=2, dtype="float32") == 3
    writer.commit()
    want = ref.run(prompts, capture=sites)
    for site in sites:
        got, index = store.export(writer.run_id, site, with_index=True)
        expected = want.cache[site][torch.as_tensor(index["prompt_id"]), torch.as_tensor(index["position"])]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_training_steps_equal_the_cpu_engine(pipe):
    local_model = load_model(MODEL)  # trained here: not the shared reference
    adam = AdamConfig(lr=1e-3, eps=1e-4)
    before = pipe.get_parameters()
    try:
        with local_model.trainer(adam) as local, pipe.trainer(adam) as remote:
            for _ in range(2):
                torch.testing.assert_close(cpu(remote.step(CLEAN + CORRUPT, next_token_loss)),
                                           local.step(CLEAN + CORRUPT, next_token_loss), **TOL)
        want, got = local_model.get_parameters(), pipe.get_parameters()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        pipe.set_parameters(before)
