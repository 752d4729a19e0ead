"""Exemplar directions of a partition run, for ablation and steering in later specs.

A spec names one as ``{run_id: <partition run>, region: N}``; :mod:`interplab.analyses.directions`
resolves such references (and probe ones) into engine interventions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from interplab.analyses.partition.dictionary import load_dictionary

if TYPE_CHECKING:
    from interplab.store import Store


def exemplar_direction(store: Store, run_id: str, region: int, *, unit: bool = True) -> np.ndarray:
    """Region ``region``'s exemplar of the committed partition run ``run_id``: its unit direction
    (``unit=True``) or the observed activation itself, ``float32 [d]``."""
    dictionary = load_dictionary(store, run_id)
    if unit:
        return dictionary.direction(region)
    dictionary.direction(region)  # range check
    return dictionary.vectors[region].astype(np.float32)
