"""Reading and writing a model's weights on either backend, and the names a layer-range finetune trains.

    theta = get_weights(model)             # name -> float32 CPU copy (a tied head appears once)
    set_weights(model, graft)              # copy values in (every stage of a pipeline gets its own)
    names = trainable_names(model, (0, 22))   # for make_trainer(model, adam, trainable=names)

Names are those of ``model.model.named_parameters()`` of the single-process model; with tied
embeddings the head is the embedding. A :class:`~interplab.runtime.pipeline.PipelineModel` routes
values to the stages that hold them (``PipelineModel.set_parameters``; a tied embedding's value
reaches both of its copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Weights = dict[str, torch.Tensor]


def _is_pipeline(model) -> bool:
    from interplab.runtime.pipeline import PipelineModel

    return isinstance(model, PipelineModel)


def layer_prefix(model) -> str:
    return f"{model.spec.base}.{model.spec.layers}."


def layer_of(model, name: str) -> int | None:
    """Decoder layer of a parameter name (None for embeddings, final norm, head)."""
    prefix = layer_prefix(model)
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def _tied_names(model) -> tuple[str, str] | None:
    """``(head name, embedding name)`` when the model ties them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    spec = model.spec
    return f"{spec.lm_head}.weight", f"{spec.base}.{spec.embed}.weight"


def select(model, names: Sequence[str], layers: tuple[int, int] | None) -> list[str]:
    """Names of parameters in decoder layers ``[start, stop)`` (all names when ``layers`` is None)."""
    if layers is None:
        return list(names)
    start, stop = layers
    return [n for n in names if (lay := layer_of(model, n)) is not None and start <= lay < stop]


# ------------------------------------------------------------------ get / set
def get_weights(model) -> Weights:
    """Every parameter as a float32 CPU copy."""
    if not _is_pipeline(model):
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.model.named_parameters()}
    out = {n: v.to(torch.float32) for n, v in model.stage_parameters().items()}
    tied = _tied_names(model)
    if tied is not None and tied[0] in out and tied[1] in out:
        del out[tied[0]]
    return out


def set_weights(model, weights: Weights) -> None:
    """Copy ``weights`` (name -> tensor, every parameter) into the model."""
    names = get_weights_names(model)
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"set_weights: no value for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if _is_pipeline(model):
        model.set_parameters({n: weights[n] for n in names})
        return
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            param.copy_(weights[name].to(param.device, param.dtype))


# ------------------------------------------------------------------ layer ranges
def trainable_names(model, layers: tuple[int, int] | None) -> list[str]:
    """Parameters a finetune with ``layers`` updates (all when None; else only those decoder layers)."""
    return select(model, get_weights_names(model), layers)


def get_weights_names(model) -> list[str]:
    """Every parameter's name (a tied head appears once, as the embedding)."""
    if not _is_pipeline(model):
        return [n for n, _ in model.model.named_parameters()]
    return model.parameter_names()
