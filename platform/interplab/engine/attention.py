"""The attention kernel interplab registers with transformers' ``AttentionInterface``.

Hugging Face attention modules project and rotate q/k/v themselves and then call an attention
function by name. interplab registers ``"interplab"``: for layers the active plan does not touch it
runs PyTorch's fused ``scaled_dot_product_attention`` (the fast path); for layers whose ``q``, ``k``,
``v``, ``pattern`` or ``z`` are captured, changed or differentiated it computes attention explicitly,
with grouped-query heads expanded to query heads so every query head has its own ``k``/``v``.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from interplab.engine.sites import SiteKind

if TYPE_CHECKING:
    from interplab.engine.plan import HookPlan

ATTN_IMPLEMENTATION = "interplab"

# the active plan and the layer of each attention module (by id)
ActivePlan = tuple["HookPlan", dict[int, int]]

_ACTIVE: ContextVar[ActivePlan | None] = ContextVar("interplab_active_plan", default=None)


def activate(plan: HookPlan, layer_of: dict[int, int]) -> Token[ActivePlan | None]:
    """Make ``plan`` the active plan for attention calls (returns a token for :func:`deactivate`)."""
    return _ACTIVE.set((plan, layer_of))


def deactivate(token: Token[ActivePlan | None]) -> None:
    _ACTIVE.reset(token)


def register() -> None:
    """Register the kernel with transformers (idempotent; called when a model is wrapped)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, interplab_attention)


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def interplab_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,  # the rest of transformers' attention-function arguments (unused)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``query`` ``[b, h, s, d]``, ``key``/``value`` ``[b, h_kv, s, d]`` -> ``z`` ``[b, s, h, d]``, pattern."""
    active = _ACTIVE.get()
    layer: int | None = None
    plan: HookPlan | None = None
    if active is not None:
        plan, layer_of = active
        layer = layer_of.get(id(module))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if plan is not None and layer is not None:
        if plan.record_kv:
            plan.kv[layer] = (key.detach(), value.detach())
        if plan.prefix is not None and plan.prefix.length > 0:
            cached_k, cached_v = plan.prefix.layer_kv(layer, key.shape[0])
            key = torch.cat([cached_k.to(key.device, key.dtype), key], dim=2)
            value = torch.cat([cached_v.to(value.device, value.dtype), value], dim=2)
    # the plan, where it touches this layer's attention (the explicit path must run)
    hooked = plan if plan is not None and layer is not None and plan.hooks_attention(layer) else None
    if hooked is None and softcap is None:
        z = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout if module.training else 0.0,
            is_causal=attention_mask is None and query.shape[2] > 1,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return z.transpose(1, 2).contiguous(), None

    n_heads = query.shape[1]
    key = _expand_kv(key, n_heads)
    value = _expand_kv(value, n_heads)
    if hooked is not None:
        # the captured per-head layout [b, s, h, d] (SiteKind.layout)
        query = hooked.process(SiteKind.Q, layer, query.transpose(1, 2)).transpose(1, 2)
        key = hooked.process(SiteKind.K, layer, key.transpose(1, 2)).transpose(1, 2)
        value = hooked.process(SiteKind.V, layer, value.transpose(1, 2)).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    else:
        s_q, s_k = scores.shape[-2:]
        causal = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).tril(s_k - s_q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = F.dropout(pattern, p=dropout, training=module.training)
    if hooked is not None:
        pattern = hooked.process(SiteKind.PATTERN, layer, pattern)  # [b, h, q, k], its captured layout
    z = torch.matmul(pattern, value).transpose(1, 2)
    if hooked is not None:
        z = hooked.process(SiteKind.Z, layer, z)
    return z.contiguous(), pattern
