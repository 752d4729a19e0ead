"""SmolLM2-135M (30 layers, tied embeddings) split in 2 stages, each loading only its own tensors."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.runtime import AdamConfig, make_trainer
from tests.runtime.helpers import logit_diff, next_token_loss

pytestmark = pytest.mark.slow

PROMPTS = ["The Eiffel Tower is in the city of", "When Mary and John went to the store, John gave a drink to"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def pipe(ray_cluster):
    from interplab.runtime import ParallelConfig
    from interplab.runtime.pipeline import PipelineModel

    # One micro-batch per call: splitting a batch changes float32 rounding (other shapes, and rows
    # without padding take the fused causal kernel) by ~3e-6 relative on 30 layers' logits, which is
    # batch composition, not the pipeline; the tiny-model tests cover micro-batching at 1e-5.
    with PipelineModel("smollm2-135m", ParallelConfig(stages=[[0, 11], [11, 30]], micro_batches=1)) as pipe:
        yield pipe


def test_stages_hold_only_their_own_layers(pipe):
    params = pipe.stage_parameters()
    layers = {int(n.split(".")[2]) for n in params if n.startswith("model.layers.")}
    assert layers == set(range(30))
    assert "model.embed_tokens.weight" in params and "lm_head.weight" in params
    assert pipe.stage_ranges == [(0, 11), (11, 30)]


def test_captures_sweep_and_gradients(pipe, smollm2):
    sites = ["embed", "resid_pre.5", "z.10", "resid_post.11", "mlp_post.20", "final"]
    want = smollm2.run(PROMPTS, capture=sites, positions=[-1])
    got = pipe.run(PROMPTS, capture=sites, positions=[-1])
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    for site in sites:
        torch.testing.assert_close(got.cache[site], want.cache[site], **TOL, msg=site)
    grad_sites = ["embed", "resid_pre.11", "head_out.20", "resid_post.29"]
    want_g = smollm2.gradients(PROMPTS, logit_diff, grad_sites, logits="last")
    got_g = pipe.gradients(PROMPTS, logit_diff, grad_sites, logits="last")
    torch.testing.assert_close(got_g.value, want_g.value, **TOL)
    for site in grad_sites:
        torch.testing.assert_close(got_g.grads[site], want_g.grads[site], **TOL, msg=site)


def test_adam_step_with_tied_embeddings(pipe):
    ref = load_model("smollm2-135m")
    adam = AdamConfig(lr=1e-4, eps=1e-4)
    want_loss = make_trainer(ref, adam).step(PROMPTS, next_token_loss)
    got_loss = make_trainer(pipe, adam).step(PROMPTS, next_token_loss)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    ref_params = dict(ref.model.named_parameters(remove_duplicate=False))
    got = pipe.stage_parameters()
    # the tied matrix: the first stage's embedding and the last stage's head both equal the one-process update
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(got[name], ref_params[name].detach(), **TOL, msg=name)
    worst = max((got[n] - ref_params[n].detach()).abs().max().item() for n in got)
    assert worst < 1e-5
