"""Per-head input sites q_in/k_in/v_in and mlp_in: same forward, own gradients, patchable per head."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.engine.interventions import Intervention
from interplab.engine.sites import SiteError

PROMPTS = ["the cat sat on the mat", "a dog ran"]
SPLIT = ["llama", "qwen2", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", SPLIT)
def test_split_forward_is_the_fused_forward(family):
    model = load_model(f"tiny-{family}")
    base = model.run(PROMPTS).logits
    touch = [Intervention(f"{k}.1", "apply", fn=lambda x: x * 1.0) for k in ("q_in", "k_in", "v_in", "mlp_in")]
    stream = "resid_mid.1" if model.has_resid_mid else "resid_pre.1"
    out = model.run(PROMPTS, interventions=touch, capture=["q_in.1", "v_in.1.2", "resid_pre.1", "mlp_in.1", stream])
    assert torch.allclose(out.logits, base, atol=1e-5)
    expanded = out.cache["resid_pre.1"][:, :, None].expand(-1, -1, model.n_heads, -1)
    assert torch.equal(out.cache["q_in.1"], expanded)
    assert out.cache["v_in.1.2"].shape[2] == 1
    assert torch.equal(out.cache["mlp_in.1"], out.cache[stream])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_split_gradients_add_up(family):
    model = load_model(f"tiny-{family}")
    metric = lambda logits, batch: logits[:, -1, :5].sum()  # noqa: E731
    sites = ["q_in.1", "k_in.1", "v_in.1", "resid_pre.1", "resid_mid.1", "mlp_in.1", "resid_post.1"]
    g = model.gradients(PROMPTS, metric, sites).grads
    heads = sum(g[f"{k}.1"].sum(2) for k in ("q_in", "k_in", "v_in"))
    # the stream before attention feeds the heads and the skip connection (whose gradient is resid_mid's)
    assert torch.allclose(heads + g["resid_mid.1"], g["resid_pre.1"], atol=1e-5)
    assert torch.allclose(g["mlp_in.1"] + g["resid_post.1"], g["resid_mid.1"], atol=1e-5)


@pytest.mark.parametrize("family", SPLIT)
def test_derived_head_input_gradients_equal_materialised_ones(family):
    """Gradient-only layers derive J_normᵀ W_hᵀ g_h after the backward pass; a patched layer gives every
    head its own normed copy of the stream. Both must give the same per-head input gradients."""
    model = load_model(f"tiny-{family}")
    metric = lambda logits, batch: (logits[:, -1, :7] ** 2).sum()  # noqa: E731
    sites = ["q_in.1", "k_in.1", "v_in.1", "q_in.0"]
    derived = model.gradients(PROMPTS, metric, sites).grads
    noop = [Intervention(f"{k}.1", "apply", fn=lambda x: x * 1.0) for k in ("q_in", "k_in", "v_in")]
    materialised = model.gradients(PROMPTS, metric, sites, interventions=noop).grads
    for site in sites:
        assert derived[site].shape == (2, derived[site].shape[1], model.n_heads, model.d_model)
        assert derived[site].abs().amax() > 1e-4
        torch.testing.assert_close(derived[site], materialised[site], atol=1e-5, rtol=1e-4)


def test_patching_one_heads_key_input_changes_only_that_head():
    model = load_model("tiny-llama")
    vec = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    base = model.run(PROMPTS, capture=["z.1"]).cache["z.1"]
    out = model.run(PROMPTS, capture=["z.1"], interventions=[Intervention("k_in.1", "add", value=vec, heads=[2])]).cache["z.1"]
    changed = (out - base).abs().amax(dim=(0, 1, 3))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] < 1e-6)  # grouped kv heads 2 and 3 share k_proj rows


def test_post_norm_families_have_no_split_inputs():
    model = load_model("tiny-gemma2")
    with pytest.raises(SiteError, match="post-norms"):
        model.run(PROMPTS, capture=["q_in.0"])
    assert not any(s.kind.value == "q_in" for s in model.sites())
