"""Linear probes: logistic-regression probes per (site, layer) on stored or captured activations."""

from interplab.analyses.probes.fit import ProbeFit, accuracy, fit_probe, split_rows
from interplab.analyses.probes.tables import StoredProbe, load_probe, save_safetensors

__all__ = ["ProbeFit", "StoredProbe", "accuracy", "fit_probe", "load_probe", "save_safetensors", "split_rows"]
