"""The execution engine: hooked models, typed sites, interventions, gradients."""

from interplab.engine.cache import ActivationCache
from interplab.engine.hooked import GradResult, HookedModel, RunResult
from interplab.engine.interventions import Intervention, InterventionError, mean_ablate, patch, set_to, steer, zero
from interplab.engine.sites import Site, SiteError, SiteKind
from interplab.engine.stream import CaptureChunk
from interplab.engine.tokens import TokenBatch, TokenizationError

__all__ = [
    "ActivationCache",
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
