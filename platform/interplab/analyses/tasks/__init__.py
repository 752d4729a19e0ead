"""Task datasets: clean/corrupted prompt pairs with an answer and a wrong token."""

from interplab.analyses.tasks.facts import facts_pairs
from interplab.analyses.tasks.ioi import IOI_CORRUPTIONS, ioi_pairs
from interplab.analyses.tasks.pairs import PairSet, PromptPair, TaskError, load_pairs

__all__ = ["IOI_CORRUPTIONS", "PairSet", "PromptPair", "TaskError", "facts_pairs", "ioi_pairs", "load_pairs"]
