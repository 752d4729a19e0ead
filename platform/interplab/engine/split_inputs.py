"""Per-head input sites: ``q_in``, ``k_in``, ``v_in`` (``[b, s, h, d_model]``) and ``mlp_in``.

In a pre-norm transformer every head reads the same residual stream. Circuit discovery treats the
query, key and value input of each head as a separate destination, so that one head's key input can
be patched while its query input stays clean (and so that a backward pass yields one gradient per
head and per q/k/v). When a plan touches ``q_in``/``k_in``/``v_in`` of a layer, the engine gives each
query head its own copy of the stream (grouped-query heads expanded), applies the attention norm to
each copy and multiplies it by that head's rows of the projection. Without patches the result equals
the fused projection; the layer's other computations are unchanged.

When a layer's q/k/v inputs are only differentiated (no patch, no capture), nothing is copied in the
forward pass: the projections run fused, grouped key/value heads are repeated to one per query head,
and each head's input gradient is derived after the backward pass from the gradient at its
projection output, ``∂m/∂x_h = J_norm(x)ᵀ W_hᵀ ∂m/∂y_h`` (:class:`_LayerGrads`). Both ways give
the same gradients; the derived one costs about one extra projection backward per layer.

``mlp_in`` is the stream the MLP reads before its norm (``resid_mid``, or ``resid_pre`` for parallel
residual layers); a change there reaches the MLP only, not the skip connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from interplab.engine.norms import norm_vjp, project_normed
from interplab.engine.plan import HookPlan
from interplab.engine.sites import Site, SiteError, SiteKind

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel
    from interplab.models.arch.base import QKVLayout

# a forward hook that replaces a projection's output
ProjectionHook = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]

_QKV_ORDER = ("q", "k", "v")  # order of the blocks of a fused q/k/v projection (QKVLayout.fused)


def _component(kind: SiteKind) -> int:
    """0, 1 or 2: the fused-projection block of a split-input kind (:attr:`SiteKind.qkv`)."""
    return _QKV_ORDER.index(kind.qkv)


def _projection_path(layout: QKVLayout, kind: SiteKind) -> str:
    """The module a split-input kind's projection is (``layout.q``, ``.k`` or ``.v``)."""
    if kind.qkv is None:
        raise SiteError(f"{kind.value!r} is not a per-head q/k/v input kind")
    return {"q": layout.q, "k": layout.k, "v": layout.v}[kind.qkv]


def projection_rows(layout: QKVLayout, component: int, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
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


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection module (``nn.Linear``, or GPT-2's ``Conv1D``)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} is not a projection: its weight is not a tensor")
    return weight


def projection_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias of a projection module (``nn.Linear``, or GPT-2's ``Conv1D``), None if it has none."""
    bias = module.bias
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{type(module).__name__} is not a projection: its bias is not a tensor")
    return bias


def _weight_out_in(module: nn.Module, transposed: bool) -> torch.Tensor:
    weight = projection_weight(module)
    return weight.t() if transposed else weight


def _with_kv_pairs(kinds: Iterable[SiteKind]) -> list[SiteKind]:
    """``kinds`` in q, k, v order, with k and v together (the attention kernel needs as many key
    heads as value heads)."""
    chosen = set(kinds)
    if chosen & {SiteKind.K_IN, SiteKind.V_IN}:
        chosen |= {SiteKind.K_IN, SiteKind.V_IN}
    return sorted(chosen, key=_component)


class _Layer:
    """What both kinds of per-layer hooks need: the plan, the layer's norm and q/k/v layout."""

    def __init__(self, hooked: HookedModel, plan: HookPlan, layer: int) -> None:
        layout = hooked.spec.qkv
        if layout is None:  # validate_site refuses these kinds for such families
            raise SiteError(f"the {hooked.spec.name} family has no per-head q/k/v input sites")
        self.plan = plan
        self.layer = layer
        self.layout = layout
        self.block = hooked.layer(layer)
        self.n_heads, self.n_kv, self.head_dim = hooked.n_heads, hooked.n_kv_heads, hooked.head_dim
        self.ln = self.block.get_submodule(self.layout.ln)


class _LayerInputs(_Layer):
    """Hooks of one layer: stash each head's processed input, then project it per head."""

    def __init__(self, hooked: HookedModel, plan: HookPlan, layer: int) -> None:
        super().__init__(hooked, plan, layer)
        self.kinds = _with_kv_pairs(k for k in SiteKind if k.split_input and plan.active(k, layer))
        device = projection_weight(self.block.get_submodule(self.layout.q)).device
        self.rows = {
            k: projection_rows(self.layout, _component(k), self.n_heads, self.n_kv, self.head_dim).to(device) for k in self.kinds
        }
        self.inputs: dict[SiteKind, torch.Tensor] = {}

    def ln_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
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

    def _project(self, kind: SiteKind, module: nn.Module) -> torch.Tensor:
        """``[b, s, h, d_head]``: each head's rows of ``module`` applied to its own normed input."""
        rows = self.rows[kind]
        weight = _weight_out_in(module, self.layout.transposed)[rows]  # [h, d_head, d_model]
        bias = projection_bias(module)
        return project_normed(self.ln, self.inputs.pop(kind), weight, None if bias is None else bias[rows])

    def separate_hook(self, kind: SiteKind) -> ProjectionHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            y = self._project(kind, module)
            return y.reshape(*y.shape[:2], -1)

        return hook

    def covers(self, module: nn.Module) -> bool:
        """True if the hooks replace every output feature of the fused ``module``."""
        return sum(r.numel() for r in self.rows.values()) == _weight_out_in(module, self.layout.transposed).shape[0]

    def fused_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if output.shape[1] == 0:  # skipped (see skip_projection): every feature is written below
            b, s = self.inputs[self.kinds[0]].shape[:2]
            out = output.new_empty(b, s, output.shape[-1])
        else:
            out = output.clone()
        for kind in self.kinds:
            out[..., self.rows[kind].reshape(-1)] = self._project(kind, module).reshape(*out.shape[:2], -1)
        return out


def skip_projection(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: run ``module`` on zero positions (its output is replaced by a forward hook)."""
    return (args[0][:, :0], *args[1:])


class _LayerGrads(_Layer):
    """Gradient-only q/k/v inputs of one layer: register projection outputs as gradient targets and
    derive each head's input gradient from theirs (see the module docstring)."""

    def __init__(self, hooked: HookedModel, plan: HookPlan, layer: int, kinds: list[SiteKind]) -> None:
        super().__init__(hooked, plan, layer)
        self.kinds = kinds
        self.stream: torch.Tensor | None = None

    def ln_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.stream = x.detach()
        for kind in self.kinds:  # a capture is the stream itself, one view per head
            self.plan.record(kind, self.layer, x[:, :, None, :].expand(*x.shape[:2], self.n_heads, x.shape[-1]))
        return None

    def _derive(self, kind: SiteKind, module: nn.Module, columns: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``g`` at the target's ``columns`` ``[h, d_head]`` -> gradient of each head's input ``[b, s, h, d]``."""
        rows = projection_rows(self.layout, _component(kind), self.n_heads, self.n_kv, self.head_dim)
        stream, ln = self.stream, self.ln
        if stream is None:  # ln_pre_hook runs before the projection whose hook asks for this
            raise RuntimeError(f"layer {self.layer}: the q/k/v projection ran before its norm's input was seen")
        contiguous = torch.equal(columns.reshape(-1) - columns[0, 0], torch.arange(columns.numel()))

        def derive(g: torch.Tensor) -> torch.Tensor:
            weight = _weight_out_in(module, self.layout.transposed).detach()[rows.to(g.device)]  # [h, d_head, d]
            if contiguous:  # a block of columns: a view, no copy
                # torch leaves Tensor.unflatten unannotated
                g = g.narrow(-1, int(columns[0, 0]), columns.numel()).unflatten(-1, tuple(columns.shape))  # type: ignore[no-untyped-call]
            else:
                g = g[..., columns.to(g.device)]
            per_head = torch.einsum("bsho,hoi->hbsi", g, weight)
            return norm_vjp(ln, stream, per_head, overwrite=True).to(g.dtype).permute(1, 2, 0, 3)

        return derive

    def _target(self, kind: SiteKind, tensor: torch.Tensor, module: nn.Module, columns: torch.Tensor) -> None:
        site = Site(kind, self.layer)
        if site in self.plan.grad_sites:
            self.plan.grad_tensors[site] = tensor
            self.plan.grad_derive[site] = self._derive(kind, module, columns)

    def separate_hook(self, kind: SiteKind) -> ProjectionHook:
        groups = 1 if kind.qkv == "q" else self.n_heads // self.n_kv  # keys and values are grouped
        columns = torch.arange(self.n_heads * self.head_dim).reshape(self.n_heads, self.head_dim)

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if groups > 1:  # one key/value per query head, so each has a gradient of its own
                b, s, _ = output.shape
                output = output.view(b, s, self.n_kv, self.head_dim).repeat_interleave(groups, dim=2).reshape(b, s, -1)
            if kind in self.kinds:
                self._target(kind, output, module, columns)
            return output

        return hook

    def fused_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        for kind in self.kinds:
            columns = projection_rows(self.layout, _component(kind), self.n_heads, self.n_kv, self.head_dim)
            self._target(kind, output, module, columns)
        return None


def _unpatched(plan: HookPlan, layer: int, kinds: set[SiteKind]) -> bool:
    """No intervention on these kinds: captures and gradients need no per-head copies."""
    return not any(plan.intervened(k, layer) for k in kinds)


def _fused_gqa(hooked: HookedModel) -> bool:
    layout = hooked.spec.qkv
    return layout is not None and layout.fused is not None and hooked.n_kv_heads != hooked.n_heads


def _install_grads(hooked: HookedModel, plan: HookPlan, layer: int, kinds: set[SiteKind]) -> list[RemovableHandle]:
    state = _LayerGrads(hooked, plan, layer, sorted(kinds, key=_component))
    layout, block = state.layout, state.block
    handles = [state.ln.register_forward_pre_hook(state.ln_pre_hook)]
    if layout.fused is not None:
        return handles + [block.get_submodule(layout.q).register_forward_hook(state.fused_hook)]
    for kind in _with_kv_pairs(kinds):
        handles.append(block.get_submodule(_projection_path(layout, kind)).register_forward_hook(state.separate_hook(kind)))
    return handles


def install(hooked: HookedModel, plan: HookPlan, layer: int, kinds: set[SiteKind]) -> list[RemovableHandle]:
    """Install the hooks for the split-input kinds of ``layer`` the plan uses; returns the handles."""
    handles: list[RemovableHandle] = []
    block = hooked.layer(layer)
    split = {k for k in kinds if k.split_input}
    if split and _unpatched(plan, layer, split) and not _fused_gqa(hooked):
        handles += _install_grads(hooked, plan, layer, split)
    elif split:
        state = _LayerInputs(hooked, plan, layer)
        layout = state.layout
        handles.append(state.ln.register_forward_pre_hook(state.ln_pre_hook))
        if layout.fused is None:
            for kind in state.kinds:
                module = block.get_submodule(_projection_path(layout, kind))
                handles.append(module.register_forward_pre_hook(skip_projection))
                handles.append(module.register_forward_hook(state.separate_hook(kind)))
        else:
            module = block.get_submodule(layout.q)
            if state.covers(module):
                handles.append(module.register_forward_pre_hook(skip_projection))
            handles.append(module.register_forward_hook(state.fused_hook))
    if SiteKind.MLP_IN in kinds:
        ln_mlp = hooked.spec.ln_mlp
        if ln_mlp is None:  # validate_site refuses mlp_in for such families
            raise SiteError(f"the {hooked.spec.name} family has no mlp_in site")
        ln = block.get_submodule(ln_mlp)

        def mlp_in_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # a view of its own: the stream also feeds the skip connection, whose gradient is not the MLP's
            return (plan.process(SiteKind.MLP_IN, layer, args[0].view_as(args[0])), *args[1:])

        handles.append(ln.register_forward_pre_hook(mlp_in_hook))
    return handles
