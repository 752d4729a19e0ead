"""The execution engine: hooked models, typed sites, interventions, gradients."""

from interplab.engine.backend import Backend, CaptureSink
from interplab.engine.cache import ActivationCache
from interplab.engine.hooked import HookedModel
from interplab.engine.interventions import Intervention, InterventionError, mean_ablate, patch, set_to, steer, zero
from interplab.engine.results import GradResult, RunResult, StageRequest
from interplab.engine.sites import Site, SiteError, SiteKind
from interplab.engine.stream import CaptureChunk
from interplab.engine.tokens import TokenBatch, TokenizationError
from interplab.engine.training import AdamConfig, Trainer
from interplab.engine.work import LayerWork

__all__ = [
    "ActivationCache",
    "AdamConfig",
    "Backend",
    "CaptureSink",
    "LayerWork",
    "StageRequest",
    "Trainer",
    "CaptureChunk",
    "GradResult",
    "HookedModel",
    "Intervention",
    "InterventionError",
    "RunResult",
    "Site",
    "SiteError",
    "SiteKind",
    "TokenBatch",
    "TokenizationError",
    "mean_ablate",
    "patch",
    "set_to",
    "steer",
    "zero",
]
