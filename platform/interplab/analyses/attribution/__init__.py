"""Input attribution by perturbation: iterative (ItP) and hierarchical (HiPe)."""

from interplab.analyses.attribution.driver import Attribution, HipeConfig, attribute
from interplab.analyses.attribution.inputs import AttributionTask, build_task
from interplab.analyses.attribution.methods import UnitScores, hipe, itp
from interplab.analyses.attribution.perturb import Cost, Perturber

__all__ = [
    "Attribution",
    "AttributionTask",
    "Cost",
    "HipeConfig",
    "Perturber",
    "UnitScores",
    "attribute",
    "build_task",
    "hipe",
    "itp",
]
