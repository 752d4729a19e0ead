"""The compiled-graph transport (Ray Compiled Graphs; shared memory on CPU): same answers as the
engine, coexists with object-reference calls (gradients, training), survives a killed stage."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from interplab import load_model
from interplab.engine import Intervention
from interplab.runtime import ParallelConfig, StageError
from interplab.runtime.pipeline import PipelineModel
from tests.runtime.helpers import CLEAN, CORRUPT, resid_sweep

pytestmark = pytest.mark.slow

PROMPTS = ["the cat sat on the mat", "a dog ran far", "Mary and John went to the store", "hello"]


@pytest.fixture
def compiled(ray_cluster):
    pipe = PipelineModel("tiny-llama", ParallelConfig(stages=3, micro_batches=2, transport="compiled", max_retries=5))
    yield pipe
    pipe.close()


def test_compiled_run_equals_the_engine_and_interleaves_with_gradients(compiled):
    ref = load_model("tiny-llama")
    sites = ["embed", "resid_pre.1", "z.2", "resid_post.2"]
    patch = [Intervention("resid_pre.2", "add", value=torch.full((ref.d_model,), 0.1))]
    want = ref.run(PROMPTS, capture=sites, interventions=patch)
    for _ in range(2):  # the second call reuses the compiled graph
        got = compiled.run(PROMPTS, capture=sites, interventions=patch)
        assert compiled.scheduler.graphs.graphs, "the run did not go through a compiled graph"
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for site in sites:
            torch.testing.assert_close(got.cache[site], want.cache[site], rtol=1e-5, atol=1e-5)
    # gradients use object references: the graph is torn down first, then rebuilt by the next run
    grads = compiled.gradients(PROMPTS, lambda logits, batch: logits[:, -1, :4].sum(), ["resid_pre.1"])
    assert not compiled.scheduler.graphs.graphs
    want_grads = ref.gradients(PROMPTS, lambda logits, batch: logits[:, -1, :4].sum(), ["resid_pre.1"])
    torch.testing.assert_close(grads.grads["resid_pre.1"], want_grads.grads["resid_pre.1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid_sweep(compiled, CLEAN, CORRUPT, range(3)), resid_sweep(ref, CLEAN, CORRUPT, range(3)),
                               rtol=1e-5, atol=1e-5)
    assert compiled.scheduler.graphs.graphs


def test_compiled_run_errors_name_the_stage(compiled):
    bad = [Intervention("resid_pre.2", "add", value=torch.ones(3))]  # wrong width: fails inside stage 2
    with pytest.raises(RuntimeError) as local:  # torch's own shape error, in this process
        load_model("tiny-llama").run(PROMPTS, interventions=bad)
    with pytest.raises(type(local.value), match="must match the size") as info:
        compiled.run(PROMPTS, interventions=bad)
    assert isinstance(info.value.__cause__, StageError) and info.value.__cause__.stage == 2
    assert "stage 2 (layers 2..2)" in str(info.value.__cause__)


def test_compiled_run_survives_a_killed_stage(compiled):
    ref = load_model("tiny-llama")
    want = ref.run(PROMPTS).logits
    torch.testing.assert_close(compiled.run(PROMPTS).logits, want, rtol=1e-5, atol=1e-5)
    pids = compiled.stage_pids()  # tears the graph down; the next run compiles it again
    compiled.run(PROMPTS)
    os.kill(pids[1], signal.SIGKILL)
    torch.testing.assert_close(compiled.run(PROMPTS).logits, want, rtol=1e-5, atol=1e-5)
    assert compiled.stage_pids()[1] != pids[1]
    torch.testing.assert_close(compiled.run(PROMPTS).logits, want, rtol=1e-5, atol=1e-5)
