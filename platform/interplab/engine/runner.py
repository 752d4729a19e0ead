"""The layer loop: embeddings -> decoder layers [start, stop) -> final norm -> unembedding.

interplab runs the Hugging Face modules of a model itself, layer by layer, instead of calling the
model's ``forward``. That makes residual-stream sites plain points in a loop (no hooks), and it lets
one process run any contiguous block of layers: the single-process engine runs ``[0, n_layers)`` with
embedding and head, a pipeline stage runs its own block on hidden states received from the previous
stage. Masks and rotary embeddings are built here the way each family's model builds them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch

from interplab.engine.arena import Lease
from interplab.engine.plan import Fork, HookPlan
from interplab.engine.sites import SiteKind

if TYPE_CHECKING:
    from typing import NotRequired  # Python 3.11; annotations only

    from interplab.engine.hooked import HookedModel


class LayerKwargs(TypedDict):
    """The keyword arguments a Hugging Face decoder layer is called with."""

    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    position_embeddings: NotRequired[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerContext:
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    masks: dict[str, torch.Tensor | None]
    layer_types: list[str]

    def kwargs(self, layer: int, rows: int | None = None) -> LayerKwargs:
        """Keyword arguments of a decoder layer; ``rows`` trims a per-row mask to a batch's first rows."""
        mask = self.masks[self.layer_types[layer]]
        if mask is not None and rows is not None and mask.shape[0] > rows:
            mask = mask[:rows]
        out: LayerKwargs = {"attention_mask": mask, "position_ids": self.position_ids}
        if self.rotary is not None:
            out["position_embeddings"] = self.rotary
        return out


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def build_context(
    hooked: HookedModel, attention_mask: torch.Tensor, hidden: torch.Tensor, start: int, stop: int, offset: int = 0
) -> LayerContext:
    """Masks and rotary tables for queries at positions ``offset..offset+q-1`` (``q = hidden.shape[1]``)
    over keys ``0..offset+q-1`` (the first ``offset`` come from a cached prefix)."""
    device = hidden.device
    s = offset + hidden.shape[1]
    position_ids = torch.arange(offset, s, device=device)[None, :]
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    if hooked.spec.rotary is not None:
        rotary = hooked.base.get_submodule(hooked.spec.rotary)(hidden, position_ids=position_ids)
    layer_types = hooked.layer_types
    padded = bool((attention_mask[:, :s] == 0).any())
    key_ok = attention_mask[:, :s].to(device=device, dtype=torch.bool)[:, None, None, :]
    q_idx = torch.arange(offset, s, device=device)[:, None]
    k_idx = torch.arange(s, device=device)[None, :]
    causal = k_idx <= q_idx
    masks: dict[str, torch.Tensor | None] = {}
    for kind in {layer_types[i] for i in range(start, stop)}:
        allowed = causal
        window = hooked.sliding_window if kind == "sliding_attention" else None
        if window is not None and window < s:
            allowed = allowed & (q_idx - k_idx < window)
        elif not padded and offset == 0:
            masks[kind] = None  # plain causal: the fused kernel's is_causal path
            continue
        masks[kind] = _additive_mask(allowed[None, None] & key_ok, hidden.dtype)
    return LayerContext(position_ids, rotary, masks, layer_types)


def embed(hooked: HookedModel, input_ids: torch.Tensor, plan: HookPlan, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream's input; ``position_ids`` (``Long[1, s]``) default to ``0..s-1``."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    if hooked.spec.embed_fn is not None:
        hidden = hooked.spec.embed_fn(hooked.base, input_ids, position_ids)
    else:
        hidden = hooked.base.get_submodule(hooked.spec.embed)(input_ids)
    if plan.keep_grad and not hidden.requires_grad:
        hidden = hidden.detach().requires_grad_(True)  # a leaf, so site gradients exist
    return plan.process(SiteKind.EMBED, None, hidden)


def _rows(hidden: torch.Tensor | None, layer: int) -> torch.Tensor:
    """``hidden``, which must hold rows by ``layer`` (``run_stage`` checks this up front:
    :func:`~interplab.engine.stage_checks.check_joins`)."""
    if hidden is None:
        raise ValueError(f"run_layers: no rows at layer {layer}: pass hidden or joins[{layer}]")
    return hidden


def run_layers(
    hooked: HookedModel,
    hidden: torch.Tensor | None,
    ctx: LayerContext,
    plan: HookPlan,
    start: int,
    stop: int,
    joins: Mapping[int, torch.Tensor | Fork] | None = None,
) -> torch.Tensor:
    """Run decoder layers ``[start, stop)``. ``joins[layer]`` are rows appended to the batch just
    before ``layer`` (their ``resid_pre``, or a :class:`~interplab.engine.plan.Fork` of rows already
    in the batch): a row that only differs from layer L on starts there."""
    if plan.keep_grad and hidden is not None and not hidden.requires_grad:
        hidden = hidden.detach().requires_grad_(True)
    for layer in range(start, stop):
        if joins and layer in joins:
            join = joins[layer]
            new = _rows(hidden, layer)[join.rows.to(hidden.device)] if isinstance(join, Fork) and hidden is not None else join
            if isinstance(new, Fork):
                raise ValueError(f"run_layers: a fork at layer {layer} needs rows in the batch before it")
            hidden = new if hidden is None else torch.cat([hidden, new.to(device=hidden.device, dtype=hidden.dtype)])
        hidden = plan.process(SiteKind.RESID_PRE, layer, _rows(hidden, layer))
        if plan.active(SiteKind.RESID_MID, layer):
            plan.resid_pre[layer] = hidden
        out = hooked.layer(layer)(hidden, **ctx.kwargs(layer, hidden.shape[0]))
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = plan.process(SiteKind.RESID_POST, layer, hidden)
    return _rows(hidden, stop)


# the sites of a layer that its MLP's input comes before (so they see what the MLP returns)
_FROM_MLP = frozenset({SiteKind.MLP_IN, SiteKind.MLP_POST, SiteKind.MLP_OUT, SiteKind.RESID_POST})


def head_reads_last_only(plan: HookPlan, layer: int) -> bool:
    """Whether the last layer before the head (``layer``) may run its MLP on each row's last position
    alone (:func:`mlp_at_last_positions`): nothing captured, differentiated or recorded, and no
    intervention from that layer's MLP on (``mlp_in`` .. ``resid_post``, ``final``, ``logits``).
    Interventions before it (``resid_pre``, attention sites) act on every position as usual."""
    quiet = not plan.capture_sites and not plan.keep_grad and not plan.record_kv
    return quiet and not plan.layer_kinds(layer) & _FROM_MLP and not plan.layer_kinds(None) - {SiteKind.EMBED}


def last_positions_head(
    hooked: HookedModel, plan: HookPlan, stop: int, last: torch.Tensor | None
) -> AbstractContextManager[None]:
    """What a pass runs its layers ``[.., stop)`` in: :func:`mlp_at_last_positions` when the head
    follows them and keeps only the ``last`` positions (and :func:`head_reads_last_only`), else nothing."""
    if last is None or stop != hooked.n_layers or not head_reads_last_only(plan, stop - 1):
        return nullcontext()
    return mlp_at_last_positions(hooked, stop - 1, last)


@contextmanager
def mlp_at_last_positions(hooked: HookedModel, layer: int, last: torch.Tensor) -> Iterator[None]:
    """While it lasts, ``layer``'s MLP reads only each row's ``last`` position (``Long[b]``) and
    returns ``[b, 1, d]``; the layer's residual add broadcasts it over the positions, so each row's
    last position is exact and the others (which no logit reads: the head keeps ``last``) are not.
    The MLP is most of a layer's work, and on a logits="last" pass the last layer's other positions
    feed nothing. Families whose MLP is called with keyword arguments only run it whole."""
    mlp = hooked.layer(layer).get_submodule(hooked.spec.mlp_down.rpartition(".")[0])

    def pre(_module: torch.nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != len(last):
            return None
        x = args[0]
        rows = torch.arange(x.shape[0], device=x.device)
        return (x[rows, last.to(x.device)][:, None], *args[1:])

    handle = mlp.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def unembed(
    hooked: HookedModel, hidden: torch.Tensor, plan: HookPlan, last: torch.Tensor | None, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Final norm and unembedding; ``last`` (``Long[b]``) keeps only those positions' logits, ``vocab``
    (``Long[k]``) only those vocabulary columns (an analysis that reads a few tokens' logits need not
    pay for the whole unembedding matrix)."""
    hidden = hooked.base.get_submodule(hooked.spec.final_norm)(hidden)
    hidden = plan.process(SiteKind.FINAL, None, hidden)
    logits_hooked = plan.active(SiteKind.LOGITS)
    if last is not None and not logits_hooked:
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)][:, None]
    head: torch.nn.Module = hooked.model.get_submodule(hooked.spec.lm_head)
    cap = getattr(hooked.config, hooked.spec.logit_softcap, None) if hooked.spec.logit_softcap else None
    if vocab is not None and not logits_hooked and isinstance(head, torch.nn.Linear):
        vocab = vocab.to(head.weight.device)
        bias = head.bias[vocab] if head.bias is not None else None
        logits = torch.nn.functional.linear(hidden, head.weight[vocab], bias)
        vocab = None  # done
    else:
        whole = last is None and vocab is None and cap is None and not logits_hooked
        pooled = _linear_into_lease(head, hidden, plan.lease) if whole else None
        logits = pooled if pooled is not None else head(hidden)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    logits = plan.process(SiteKind.LOGITS, None, logits)
    if vocab is not None:
        logits = logits[..., vocab.to(logits.device)]
    if last is not None and logits.shape[1] != 1:
        logits = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)][:, None]
    return logits[:, 0] if last is not None else logits


def _linear_into_lease(head: torch.nn.Module, hidden: torch.Tensor, lease: Lease | None) -> torch.Tensor | None:
    """``head(hidden)`` written into the arena lease (see :mod:`interplab.engine.arena`), or None
    where it cannot be: no lease, a head that is not a plain ``nn.Linear`` (or carries hooks, e.g.
    accelerate's offloading), autograd on, or no room left in the buffer."""
    if lease is None or torch.is_grad_enabled() or type(head) is not torch.nn.Linear:
        return None
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return None
    weight = head.weight
    if weight.device != hidden.device or weight.dtype != hidden.dtype or not hidden.is_contiguous():
        return None
    out = lease.take_shape((*hidden.shape[:-1], weight.shape[0]), hidden.dtype)
    if out is None:
        return None
    flat, dest = hidden.view(-1, hidden.shape[-1]), out.view(-1, weight.shape[0])
    if head.bias is None:
        torch.mm(flat, weight.t(), out=dest)
    else:
        torch.addmm(head.bias, flat, weight.t(), out=dest)
    return out
