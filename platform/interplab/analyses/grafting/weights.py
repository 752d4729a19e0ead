"""Reading and writing a model's weights on any backend, and the names a layer-range finetune trains.

    theta = get_weights(model)             # name -> float32 CPU copy (a tied head appears once)
    set_weights(model, graft)              # copy values in (a pipeline's stages each get their own)
    names = trainable_names(model, (0, 22))   # for model.trainer(adam, trainable=names)

Names are those of the single-process model's ``named_parameters()``; with tied embeddings the head
is the embedding (see :meth:`~interplab.models.arch.base.ArchSpec.tied_names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interplab.engine.backend import Backend

Weights = dict[str, torch.Tensor]


def layer_of(model: Backend, name: str) -> int | None:
    """Decoder layer of a parameter name (None for embeddings, final norm, head)."""
    return model.spec.layer_of_parameter(name)


def select(model: Backend, names: Sequence[str], layers: tuple[int, int] | None) -> list[str]:
    """Names of parameters in decoder layers ``[start, stop)`` (all names when ``layers`` is None)."""
    if layers is None:
        return list(names)
    start, stop = layers
    return [n for n in names if (lay := layer_of(model, n)) is not None and start <= lay < stop]


# ------------------------------------------------------------------ get / set
def get_weights(model: Backend) -> Weights:
    """Every parameter as a float32 CPU copy."""
    return {n: v.to(torch.float32) for n, v in model.get_parameters().items()}


def set_weights(model: Backend, weights: Weights) -> None:
    """Copy ``weights`` (name -> tensor, every parameter) into the model."""
    names = model.parameter_names()
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"set_weights: no value for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    model.set_parameters({n: weights[n] for n in names})


# ------------------------------------------------------------------ layer ranges
def trainable_names(model: Backend, layers: tuple[int, int] | None) -> list[str]:
    """Parameters a finetune with ``layers`` updates (all when None; else only those decoder layers)."""
    return select(model, model.parameter_names(), layers)


def get_weights_names(model: Backend) -> list[str]:
    """Every parameter's name (a tied head appears once, as the embedding)."""
    return model.parameter_names()
