"""``build_backend``: the single-process engine or a Ray pipeline, as a :class:`~interplab.engine.backend.Backend`.

Analyses call the protocol's methods on whatever they get and never ask which backend it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from interplab.engine.backend import Backend
from interplab.engine.work import LayerWork
from interplab.runtime.config import ParallelConfig

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel


def build_backend(
    model: str,
    parallel: ParallelConfig | dict[str, object] | None = None,
    *,
    dtype: str = "float32",
    seed: int = 0,
    device: str = "cpu",
    layer_work: Callable[[HookedModel], LayerWork | None] | None = None,
) -> Backend:
    """``parallel`` None or one stage with one replica: the single-process engine, no Ray. Else a pipeline.

    ``layer_work(skeleton)`` gives the relative compute of what will run (a
    :class:`~interplab.engine.work.LayerWork`, or None) from the model's meta-device skeleton; a
    stage count is balanced by it (``parallel.balance: work``, see :class:`ParallelConfig`)."""
    if isinstance(parallel, dict):
        parallel = ParallelConfig.model_validate(parallel)
    if parallel is None or parallel.single_process:
        from interplab.models.loading import load_model

        return load_model(model, dtype=dtype, seed=seed, device=device)
    from interplab.runtime.pipeline import PipelineModel

    return PipelineModel(model, parallel, dtype=dtype, seed=seed, layer_work=layer_work)
