"""Execution backends: the single-process engine, or a Ray pipeline of stage actors (``PipelineModel``).

    backend = build_backend("smollm2-135m", ParallelConfig(stages=2))
    backend.run(prompts, capture=["resid_pre.10"])        # same call on either backend

Both implement :class:`interplab.engine.backend.Backend`. See ``docs/scaling.md`` for the design and
the arithmetic for 70B/405B models.
"""

from interplab.engine.training import AdamConfig
from interplab.engine.work import LayerWork
from interplab.runtime.backend import build_backend
from interplab.runtime.config import ParallelConfig
from interplab.runtime.errors import StageError
from interplab.runtime.split import SplitError
from interplab.runtime.training import make_trainer


def __getattr__(name: str) -> object:
    if name == "PipelineModel":  # imported lazily: it imports torch
        from interplab.runtime.pipeline import PipelineModel

        return PipelineModel
    raise AttributeError(name)


__all__ = [
    "AdamConfig",
    "LayerWork",
    "ParallelConfig",
    "PipelineModel",
    "SplitError",
    "StageError",
    "build_backend",
    "make_trainer",
]
