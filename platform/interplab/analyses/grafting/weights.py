"""Reading, writing and freezing a model's weights on either backend.

    theta = get_weights(model)             # name -> float32 CPU copy (a tied head appears once)
    set_weights(model, graft)              # copy values in (every stage of a pipeline gets its own)
    with frozen(model, trainable) as after_step: ...   # everything not in ``trainable`` stays put

Names are those of ``model.model.named_parameters()`` of the single-process model; with tied
embeddings the head is the embedding. On a :class:`~interplab.runtime.pipeline.PipelineModel` the
values travel to the stage actors through ``ActorHandle.__ray_call__`` (a function run on the actor's
:class:`~interplab.runtime.stage.StageWorker`), because the runtime has no weight-setting method yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

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


def _stage_names(worker) -> list[str]:
    return list(worker._owned_parameters())


def _stage_set(worker, values: Weights) -> int:
    with torch.no_grad():
        owned = worker._owned_parameters()
        for name, value in values.items():
            owned[name].copy_(value.to(owned[name].device, owned[name].dtype))
    return len(values)


def _stage_snapshot(worker, names: list[str]) -> int:
    owned = worker._owned_parameters()
    worker._interplab_frozen = {n: owned[n].detach().clone() for n in names if n in owned}
    return len(worker._interplab_frozen)


def _stage_restore(worker) -> int:
    frozen = getattr(worker, "_interplab_frozen", {})
    with torch.no_grad():
        owned = worker._owned_parameters()
        for name, value in frozen.items():
            owned[name].copy_(value)
    return len(frozen)


def _stage_release(worker) -> None:
    worker._interplab_frozen = {}


def _actors(model) -> list:
    return list(model._replicas[0].actors)


def _on_stages(model, fn: Callable, per_actor_args: list[tuple] | None = None) -> list:
    import ray

    actors = _actors(model)
    args = per_actor_args or [()] * len(actors)
    return ray.get([a.__ray_call__.remote(fn, *extra) for a, extra in zip(actors, args)])


def _resolve(model, name: str, weights: Weights) -> torch.Tensor | None:
    if name in weights:
        return weights[name]
    tied = _tied_names(model)
    if tied is not None and name == tied[0]:
        return weights.get(tied[1])
    return None


def set_weights(model, weights: Weights) -> None:
    """Copy ``weights`` (name -> tensor, every parameter) into the model."""
    if not _is_pipeline(model):
        params = dict(model.model.named_parameters())
        missing = sorted(set(params) - set(weights))
        if missing:
            raise KeyError(f"set_weights: no value for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        return
    per_stage = []
    for names in _on_stages(model, _stage_names):
        part = {}
        for name in names:
            value = _resolve(model, name, weights)
            if value is None:
                raise KeyError(f"set_weights: no value for {name}")
            part[name] = value
        per_stage.append((part,))
    _on_stages(model, _stage_set, per_stage)


# ------------------------------------------------------------------ freezing
def trainable_names(model, layers: tuple[int, int] | None) -> list[str]:
    """Parameters a finetune with ``layers`` updates (all when None; else only those decoder layers)."""
    return select(model, get_weights_names(model), layers)


def get_weights_names(model) -> list[str]:
    if not _is_pipeline(model):
        return [n for n, _ in model.model.named_parameters()]
    names = [n for part in _on_stages(model, _stage_names) for n in part]
    tied = _tied_names(model)
    if tied is not None and tied[1] in names:
        names = [n for n in names if n != tied[0]]
    return list(dict.fromkeys(names))


@contextmanager
def frozen(model, trainable: Sequence[str] | None) -> Iterator[Callable[[], None]]:
    """Keep every parameter outside ``trainable`` (names; None = train all) at its current value.

    Single process: ``requires_grad_(False)`` (Adam skips parameters without gradients, and no
    backward pass runs through layers below the lowest trainable one). Pipeline: each stage keeps a
    copy of its frozen parameters and the yielded ``after_step()`` restores them after every optimizer
    step, which gives the same trained weights (Adam is per parameter). Yields ``after_step``.
    """
    if trainable is None:
        yield lambda: None
        return
    keep = set(trainable)
    tied = _tied_names(model)
    if tied is not None and tied[1] in keep:
        keep.add(tied[0])
    if not _is_pipeline(model):
        params = list(model.model.named_parameters())
        before = {n: p.requires_grad for n, p in params}
        try:
            for name, param in params:
                param.requires_grad_(name in keep)
            yield lambda: None
        finally:
            for name, param in params:
                param.requires_grad_(before[name])
        return
    names_per_stage = _on_stages(model, _stage_names)
    _on_stages(model, _stage_snapshot, [([n for n in names if n not in keep],) for names in names_per_stage])
    try:
        yield lambda: _on_stages(model, _stage_restore) and None
    finally:
        _on_stages(model, _stage_release)
