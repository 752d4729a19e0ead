"""Scoped module hooks for the sites that live inside a decoder layer.

``installed(model, plan, layers)`` attaches forward hooks only where the plan needs them and removes
every one of them in ``finally``: no hook outlives the forward pass that asked for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from interplab.engine import split_inputs
from interplab.engine.plan import HookPlan
from interplab.engine.sites import Site, SiteKind

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel

# a module's output: a tensor, or a tuple that starts with one (attention modules)
Output = torch.Tensor | tuple[Any, ...]


def per_head_out(z: torch.Tensor, weight: torch.Tensor, n_heads: int, transposed: bool) -> torch.Tensor:
    """Each head's contribution to the output projection, ``[b, s, h, d_model]`` from ``z`` ``[b, s, h*d]``."""
    b, s, _ = z.shape
    z = z.reshape(b, s, n_heads, -1)
    if transposed:  # Conv1D weight [h*d, d_model]
        w = weight.reshape(n_heads, -1, weight.shape[-1])
        return torch.einsum("bshd,hdm->bshm", z, w)
    w = weight.reshape(weight.shape[0], n_heads, -1)  # Linear weight [d_model, h*d]
    return torch.einsum("bshd,mhd->bshm", z, w)


def _attn_out_hook(plan: HookPlan, layer: int, has_mid: bool) -> Callable[[nn.Module, tuple[Any, ...], Output], Output]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Output) -> Output:
        out = output[0] if isinstance(output, tuple) else output
        out = plan.process(SiteKind.ATTN_OUT, layer, out)
        if has_mid and plan.active(SiteKind.RESID_MID, layer):
            pre = plan.resid_pre.pop(layer)  # dropped now: kept until the end it would pin fresh memory
            if plan.intervened(SiteKind.RESID_MID, layer):
                mid = plan.process(SiteKind.RESID_MID, layer, pre + out)
                out = mid - pre
            elif plan.wants(SiteKind.RESID_MID, layer):
                plan.record_sum(SiteKind.RESID_MID, layer, pre, out)
                plan.alias_grad(SiteKind.RESID_MID, layer, out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def _output_hook(plan: HookPlan, kind: SiteKind, layer: int) -> split_inputs.ProjectionHook:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return plan.process(kind, layer, output)

    return hook


def _input_hook(plan: HookPlan, kind: SiteKind, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (plan.process(kind, layer, args[0]), *args[1:])

    return hook


def _head_out_hook(plan: HookPlan, layer: int, n_heads: int, transposed: bool) -> split_inputs.ProjectionHook:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        z = args[0]
        if plan.intervened(SiteKind.HEAD_OUT, layer):
            heads = per_head_out(z, split_inputs.projection_weight(module), n_heads, transposed)
            heads = plan.process(SiteKind.HEAD_OUT, layer, heads)
            output = heads.sum(dim=2)
            bias = split_inputs.projection_bias(module)
            if bias is not None:
                output = output + bias
        else:
            site = Site(SiteKind.HEAD_OUT, layer)
            if site in plan.capture_sites:
                rows = torch.arange(z.shape[0], device=z.device)[:, None]
                picked = z if plan._all_positions else z[rows, plan.positions.to(z.device)]
                weight = split_inputs.projection_weight(module)
                heads = per_head_out(picked if plan.keep_grad else picked.detach(), weight, n_heads, transposed)
                plan.captured[site] = heads
        plan.alias_grad(SiteKind.HEAD_OUT, layer, output)
        return output

    return hook


@contextmanager
def installed(hooked: HookedModel, plan: HookPlan, layers: range) -> Iterator[None]:
    """Install the hooks ``plan`` needs on ``layers`` of ``hooked`` (a HookedModel); remove them after."""
    handles: list[RemovableHandle] = []
    spec = hooked.spec
    try:
        for layer in layers:
            kinds = plan.layer_kinds(layer)
            if not kinds:
                continue
            block = hooked.layer(layer)
            if SiteKind.ATTN_OUT in kinds or SiteKind.RESID_MID in kinds:
                module = block.get_submodule(spec.attn_out)
                handles.append(module.register_forward_hook(_attn_out_hook(plan, layer, hooked.has_resid_mid)))
            if SiteKind.MLP_OUT in kinds:
                module = block.get_submodule(spec.mlp_out)
                handles.append(module.register_forward_hook(_output_hook(plan, SiteKind.MLP_OUT, layer)))
            if SiteKind.MLP_POST in kinds:
                module = block.get_submodule(spec.mlp_down)
                handles.append(module.register_forward_pre_hook(_input_hook(plan, SiteKind.MLP_POST, layer)))
            if SiteKind.HEAD_OUT in kinds:
                module = block.get_submodule(spec.o_proj)
                hook = _head_out_hook(plan, layer, hooked.n_heads, spec.o_proj_transposed)
                handles.append(module.register_forward_hook(hook))
            handles += split_inputs.install(hooked, plan, layer, kinds)
        yield
    finally:
        for handle in handles:
            handle.remove()
