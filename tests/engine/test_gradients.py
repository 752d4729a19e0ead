"""Site gradients against finite differences (float64), and a training step against transformers."""

import pytest
import torch

from interplab.engine import Intervention
from tests.conftest import PROMPTS

ANSWER, WRONG = 5, 9


def logit_diff(logits, batch):
    return (logits[:, ANSWER] - logits[:, WRONG]).mean()


def _sites(model):
    sites = ["embed", "resid_pre.1", "attn_out.0", "mlp_out.1", "mlp_post.2", "resid_post.2", "z.1", "q.2", "k.0", "v.1", "pattern.1", "head_out.0", "final"]
    if model.has_resid_mid:
        sites.append("resid_mid.1")
    return sites


def test_site_gradients_match_finite_differences(tiny64):
    batch = tiny64.tokenize(PROMPTS)
    sites = _sites(tiny64)
    result = tiny64.gradients(batch, logit_diff, sites, logits="last")
    gen = torch.Generator().manual_seed(0)
    # float64 model, but transformers computes norms and softmax in float32: a five-point stencil
    # with a moderate step keeps float32 rounding (~1e-7 / h) and truncation (O(h^4)) both small.
    h = 5e-2
    for site in sites:
        grad = result.grads[site]
        direction = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        if site.startswith("head_out"):  # per-head directions enter through the heads' sum
            direction[:, :, 1:] = 0
        if site.startswith("pattern"):
            direction = direction.transpose(1, 2)  # canonical [b, q, h, k] for the intervention
            grad_dot = (grad.transpose(1, 2) * direction).sum()
        else:
            grad_dot = (grad * direction).sum()

        def value(step):
            add = Intervention(site, "add", value=step * direction)
            return logit_diff(tiny64.run(batch, interventions=[add], logits="last").logits, batch).item()

        numeric = (-value(2 * h) + 8 * value(h) - 8 * value(-h) + value(-2 * h)) / (12 * h)
        assert numeric == pytest.approx(grad_dot.item(), rel=1e-3, abs=1e-4), site


def test_gradients_match_autograd_on_the_reference_model(family, hf_reference, tiny_models):
    """d metric / d embed through our loop equals autograd through transformers' own forward."""
    tiny = tiny_models(family)
    batch = tiny.tokenize(PROMPTS)
    ours = tiny.gradients(batch, logit_diff, ["embed"], logits="last").grads["embed"]
    embeds = tiny.run(batch, capture=["embed"]).cache["embed"].clone().requires_grad_(True)
    if family == "gpt2":  # HF adds positions to inputs_embeds itself: pass token embeddings only
        token_embeds = embeds - hf_reference.transformer.wpe(torch.arange(batch.seq_len))[None]
        out = hf_reference(inputs_embeds=token_embeds, attention_mask=batch.attention_mask).logits
    else:
        out = hf_reference(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    last = out[torch.arange(batch.size), batch.last_positions()]
    (reference,) = torch.autograd.grad(logit_diff(last, batch), embeds)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(ours[mask], reference[mask], rtol=1e-4, atol=1e-5)


def test_adam_step_through_hooked_model_equals_plain_transformers(family, hf_reference, tiny64):
    # float64: Adam's first step is lr * g / (|g| + eps), so float32 noise on tiny gradients would flip signs
    tiny = tiny64
    hf_reference.double()
    batch = tiny.tokenize(PROMPTS)
    targets = batch.input_ids[:, 1:]

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="mean")

    # Some gradients are exactly zero in exact arithmetic (e.g. key biases: softmax ignores a constant
    # shift) and only float32 rounding noise (~1e-7: transformers' norms run in float32) in practice;
    # Adam's eps=1e-4 keeps that noise from flipping the sign of a whole learning-rate step.
    ours_opt = torch.optim.Adam(tiny.model.parameters(), lr=1e-3, eps=1e-4)
    ref_opt = torch.optim.Adam(hf_reference.parameters(), lr=1e-3, eps=1e-4)
    loss_of(tiny.run(batch, grad=True).logits).backward()
    loss_of(hf_reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits).backward()
    ref_params = dict(hf_reference.named_parameters())
    for name, param in tiny.model.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    ours_opt.step()
    ref_opt.step()
    for name, param in tiny.model.named_parameters():
        gap = (param - ref_params[name]).abs().max().item()
        assert gap < 2e-6, f"{name}: parameters differ by {gap:.3g} after one Adam step"
