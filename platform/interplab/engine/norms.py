"""A layer's input norm applied per head: projections of per-head normed inputs and batched VJPs.

``project_normed(norm, x, weight, bias)`` is ``norm(x_h) @ W_hᵀ + b_h`` for every head's own input
``x_h``. For RMSNorm the norm's scale is a scalar per row and head, so it is applied to the
``d_head``-wide output instead of the ``d_model``-wide input, and the norm weight is folded into
``W_h`` (one pass over the inputs instead of five).


``norm_vjp(norm, x, v)`` is ``J_norm(x)ᵀ v`` for ``v`` ``[k, *x.shape]`` (``k`` cotangents, e.g. one
per attention head). LayerNorm and the Llama-style RMSNorm have closed forms (with ``x̂`` the
normalised input, ``σ`` its scale and ``u = w ⊙ v``):

* RMSNorm ``y = w ⊙ x / σ``, ``σ = sqrt(mean(x²) + ε)``: ``J^T v = (u - x̂ · mean(u ⊙ x̂)) / σ``;
* LayerNorm ``y = w ⊙ (x - μ) / σ + b``: ``J^T v = (u - mean(u) - x̂ · mean(u ⊙ x̂)) / σ``.

Any other norm module goes through autograd with batched cotangents (slower, same result).
"""

from __future__ import annotations

from typing import Protocol, TypeGuard

import torch
from torch import nn

# RMSNorm classes of the form  weight * x * rsqrt(mean(x^2) + variance_epsilon)  (not Gemma's 1 + weight)
_RMS_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm"}


class _RMSNorm(Protocol):
    """What the closed forms read from an RMSNorm of one of :data:`_RMS_CLASSES`."""

    weight: torch.Tensor
    variance_epsilon: float


def _rms(norm: nn.Module) -> TypeGuard[_RMSNorm]:
    return type(norm).__name__ in _RMS_CLASSES


def project_normed(norm: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[b, s, h, o]``: each head's rows ``weight[h]`` (``[h, o, d]``) applied to ``norm(x[:, :, h])``."""
    if _rms(norm):
        inv = torch.rsqrt(torch.linalg.vecdot(x.float(), x.float()) / x.shape[-1] + norm.variance_epsilon)
        out = torch.einsum("bshi,hoi->bsho", x, weight * norm.weight) * inv[..., None].to(x.dtype)
    else:
        out = torch.einsum("bshi,hoi->bsho", norm.forward(x), weight)  # forward: not its hooks
    return out if bias is None else out + bias


def norm_vjp(norm: nn.Module, x: torch.Tensor, v: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """``[k, *x.shape]``: the gradient at ``x`` for each cotangent ``v[i]`` at ``norm(x)``
    (``overwrite=True``: ``v`` is a scratch tensor the result may be computed in)."""
    x = x.detach().float()
    v = v.float()
    scale = v.mul_ if overwrite and v.dtype == torch.float32 else v.mul
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.normalized_shape == x.shape[-1:]:
        centred = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        x_hat = centred * inv
        u = scale(norm.weight.detach().float())
        u -= u.mean(-1, keepdim=True)
    elif _rms(norm):
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        x_hat = x * inv
        u = scale(norm.weight.detach().float())
    else:
        with torch.enable_grad():
            leaf = x.requires_grad_(True)
            (grad,) = torch.autograd.grad(norm.forward(leaf), leaf, v.to(leaf.dtype), is_grads_batched=True)
        return grad
    dot = torch.linalg.vecdot(u, x_hat)[..., None] / x.shape[-1]
    # (u - x̂ · dot) / σ in two passes over u
    return u.mul_(inv).addcmul_(x_hat, dot * inv, value=-1.0)
