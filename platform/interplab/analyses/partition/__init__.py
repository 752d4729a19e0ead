"""Exemplar partitioning: leader clustering of activations into an exemplar dictionary.

    from interplab.analyses.partition import build, load_dictionary, match_dictionaries, ood_scores
    builder = build(acts, threshold=0.3)                   # in memory; the job streams from the store
    d = load_dictionary(store, run_id)                     # a committed partition run
    region, distance = d.nearest(new_acts)                 # distance: the out-of-distribution score
    table = match_dictionaries(d_before, d_after, 0.9)     # preserved / new / vanished regions

The job kind (``kind: partition``) is in :mod:`.job`; see ``docs/partition.md``.
"""

from interplab.analyses.partition.dictionary import Dictionary, DictionaryError, load_dictionary
from interplab.analyses.partition.directions import exemplar_direction
from interplab.analyses.partition.leader import LeaderBuilder, ThresholdRule, build, nearest, percentile_threshold
from interplab.analyses.partition.match import OodScores, match_dictionaries, ood_scores

__all__ = [
    "Dictionary",
    "DictionaryError",
    "LeaderBuilder",
    "OodScores",
    "ThresholdRule",
    "build",
    "exemplar_direction",
    "load_dictionary",
    "match_dictionaries",
    "nearest",
    "ood_scores",
    "percentile_threshold",
]
