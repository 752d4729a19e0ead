"""Closed-form norm VJPs for many cotangents equal autograd's, one cotangent at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from interplab.engine.norms import norm_vjp, project_normed


class ScaledTanhNorm(nn.Module):  # not a known norm: takes the autograd path
    def forward(self, x):
        return torch.tanh(x) / x.norm(dim=-1, keepdim=True)


def _norm(kind: str) -> nn.Module:
    if kind == "layer":
        norm = nn.LayerNorm(16, eps=1e-5)
    elif kind == "rms":
        norm = LlamaRMSNorm(16, eps=1e-6)
    else:
        return ScaledTanhNorm()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)))
    return norm


@pytest.mark.parametrize("kind", ["layer", "rms", "other"])
def test_norm_vjp_matches_autograd(kind):
    gen = torch.Generator().manual_seed(0)
    norm = _norm(kind)
    x = torch.randn(2, 3, 16, generator=gen) * 3 + 1
    v = torch.randn(5, 2, 3, 16, generator=gen)
    got = norm_vjp(norm, x, v)
    assert torch.equal(norm_vjp(norm, x, v.clone(), overwrite=True), got)
    for i in range(5):
        leaf = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(norm(leaf), leaf, v[i])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "rms", "other"])
def test_project_normed_matches_norm_then_projection(kind):
    gen = torch.Generator().manual_seed(2)
    norm = _norm(kind)
    x = torch.randn(2, 3, 4, 16, generator=gen) * 2 - 1  # 4 heads, each its own input
    weight, bias = torch.randn(4, 5, 16, generator=gen), torch.randn(4, 5, generator=gen)
    want = torch.stack([norm(x[:, :, h]) @ weight[h].T + bias[h] for h in range(4)], dim=2)
    torch.testing.assert_close(project_normed(norm, x, weight, bias), want, atol=1e-5, rtol=1e-5)
