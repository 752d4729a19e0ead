"""Activation patching and attribution patching at sweep scale."""

from interplab.analyses.patching.driver import activation_patching, default_batch_rows, layer_work
from interplab.analyses.patching.result import PatchingResult
from interplab.analyses.patching.sweeps import Patch, Sweep, SweepError, parse_sweeps

__all__ = [
    "Patch",
    "PatchingResult",
    "Sweep",
    "SweepError",
    "activation_patching",
    "default_batch_rows",
    "layer_work",
    "parse_sweeps",
]
