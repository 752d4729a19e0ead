"""Per-head input sites: ``q_in``, ``k_in``, ``v_in`` (``[b, s, h, d_model]``) and ``mlp_in``.

In a pre-norm transformer every head reads the same residual stream. Circuit discovery treats the
query, key and value input of each head as a separate destination, so that one head's key input can
be patched while its query input stays clean (and so that a backward pass yields one gradient per
head and per q/k/v). When a plan touches ``q_in``/``k_in``/``v_in`` of a layer, the engine gives each
query head its own copy of the stream (grouped-query heads expanded), applies the attention norm to
each copy and multiplies it by that head's rows of the projection. Without patches the result equals
the fused projection; the layer's other computations are unchanged.

``mlp_in`` is the stream the MLP reads before its norm (``resid_mid``, or ``resid_pre`` for parallel
residual layers); a change there reaches the MLP only, not the skip connection.
"""

from __future__ import annotations

import torch

from interplab.engine.plan import HookPlan
from interplab.engine.sites import SPLIT_INPUT_KINDS, SiteKind

_COMPONENT = {SiteKind.Q_IN: 0, SiteKind.K_IN: 1, SiteKind.V_IN: 2}


def projection_rows(layout, component: int, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Output-feature indices ``[h, d_head]`` of each query head's q (0), k (1) or v (2) in its module."""
    heads = torch.arange(n_heads)
    source = heads if component == 0 else heads // (n_heads // n_kv_heads)
    if layout.fused is None:
        base = source * head_dim
    elif layout.fused == "blocks":
        offsets = (0, n_heads * head_dim, (n_heads + n_kv_heads) * head_dim)
        base = offsets[component] + source * head_dim
    elif layout.fused == "heads":
        base = source * 3 * head_dim + component * head_dim
    else:
        raise ValueError(f"unknown fused q/k/v layout {layout.fused!r}")
    return base[:, None] + torch.arange(head_dim)[None, :]


def _weight_out_in(module, transposed: bool) -> torch.Tensor:
    return module.weight.t() if transposed else module.weight


class _LayerInputs:
    """Hooks of one layer: stash each head's processed input, then project it per head."""

    def __init__(self, hooked, plan: HookPlan, layer: int) -> None:
        self.plan = plan
        self.layer = layer
        self.layout = hooked.spec.qkv
        self.block = hooked.layer(layer)
        self.n_heads, self.n_kv, self.head_dim = hooked.n_heads, hooked.n_kv_heads, hooked.head_dim
        self.ln = self.block.get_submodule(self.layout.ln)
        active = {k for k in SPLIT_INPUT_KINDS if plan.active(k, layer)}
        # keys and values must have the same number of heads for the attention kernel
        if active & {SiteKind.K_IN, SiteKind.V_IN}:
            active |= {SiteKind.K_IN, SiteKind.V_IN}
        self.kinds = sorted(active, key=lambda k: _COMPONENT[k])
        device = self.block.get_submodule(self.layout.q).weight.device
        self.rows = {k: projection_rows(self.layout, _COMPONENT[k], self.n_heads, self.n_kv, self.head_dim).to(device) for k in self.kinds}
        self.inputs: dict[SiteKind, torch.Tensor] = {}

    def ln_pre_hook(self, module, args):
        x = args[0]
        b, s, d = x.shape
        for kind in self.kinds:
            # a view of its own per kind, so that each kind's gradient is its own
            expanded = x[:, :, None, :].expand(b, s, self.n_heads, d)
            if self.plan.active(kind, self.layer):
                self.inputs[kind] = self.plan.process(kind, self.layer, expanded)
            else:
                self.inputs[kind] = expanded
        return None

    def _project(self, kind: SiteKind, module) -> torch.Tensor:
        """``[b, s, h, d_head]``: each head's rows of ``module`` applied to its own normed input."""
        rows = self.rows[kind]
        weight = _weight_out_in(module, self.layout.transposed)[rows]  # [h, d_head, d_model]
        normed = self.ln.forward(self.inputs.pop(kind))
        out = torch.einsum("bshi,hoi->bsho", normed, weight)
        if module.bias is not None:
            out = out + module.bias[rows]
        return out

    def separate_hook(self, kind: SiteKind):
        def hook(module, args, output):
            y = self._project(kind, module)
            return y.reshape(*y.shape[:2], -1)

        return hook

    def fused_hook(self, module, args, output):
        out = output.clone()
        for kind in self.kinds:
            out[..., self.rows[kind].reshape(-1)] = self._project(kind, module).reshape(*out.shape[:2], -1)
        return out


def install(hooked, plan: HookPlan, layer: int, kinds: set[SiteKind]) -> list:
    """Install the hooks for the split-input kinds of ``layer`` the plan uses; returns the handles."""
    handles = []
    block = hooked.layer(layer)
    if any(k in kinds for k in SPLIT_INPUT_KINDS):
        state = _LayerInputs(hooked, plan, layer)
        layout = state.layout
        handles.append(state.ln.register_forward_pre_hook(state.ln_pre_hook))
        if layout.fused is None:
            paths = {SiteKind.Q_IN: layout.q, SiteKind.K_IN: layout.k, SiteKind.V_IN: layout.v}
            for kind in state.kinds:
                handles.append(block.get_submodule(paths[kind]).register_forward_hook(state.separate_hook(kind)))
        else:
            handles.append(block.get_submodule(layout.q).register_forward_hook(state.fused_hook))
    if SiteKind.MLP_IN in kinds:
        ln = block.get_submodule(hooked.spec.ln_mlp)

        def mlp_in_hook(module, args):
            # a view of its own: the stream also feeds the skip connection, whose gradient is not the MLP's
            return (plan.process(SiteKind.MLP_IN, layer, args[0].view_as(args[0])), *args[1:])

        handles.append(ln.register_forward_pre_hook(mlp_in_hook))
    return handles
