"""Data-parallel training: a step over 2 replicas of a 2-stage pipeline equals the single-process
step, and the replicas stay bit-identical."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.runtime import AdamConfig, ParallelConfig, make_trainer
from interplab.runtime.pipeline import PipelineModel
from tests.runtime.helpers import CLEAN, CORRUPT, next_token_loss

pytestmark = pytest.mark.slow

PROMPTS = CLEAN + CORRUPT + ["Mary lives in", "The city of Paris is in France"]  # padded rows too


@pytest.mark.parametrize("trainable", [None, ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]],
                         ids=["all", "subset"])
def test_replicated_adam_steps_equal_single_process(ray_cluster, trainable):
    ref = load_model("tiny-llama")  # ties its embedding and head: the tied copies are combined too
    adam = AdamConfig(lr=1e-3, eps=1e-4)
    with PipelineModel("tiny-llama", ParallelConfig(stages=2, replicas=2, micro_batches=2)) as pipe:
        with make_trainer(ref, adam, trainable) as local, make_trainer(pipe, adam, trainable) as trainer:
            for _ in range(2):  # the second step uses each replica's Adam state
                want = local.step(PROMPTS, next_token_loss)
                got = trainer.step(PROMPTS, next_token_loss)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        first, second = pipe.stage_parameters(0), pipe.stage_parameters(1)
    ref_params = dict(ref.model.named_parameters(remove_duplicate=False))
    assert set(first) == set(second)
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"replicas differ at {name}"
        torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5, msg=name)
    changed = [n for n, v in first.items() if not torch.equal(v, load_model("tiny-llama").model.get_parameter(n))]
    assert changed, "no parameter was trained"
