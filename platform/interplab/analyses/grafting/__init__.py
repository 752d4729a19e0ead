"""Extractive structures (Feng, Russell & Steinhardt 2024): finetune on facts, weight deltas, grafting,
layer freezing, data ordering and extractive scores. See ``docs/grafting.md``; the job kind is in ``job.py``."""

from interplab.analyses.grafting.data import Example, first_hop, load_task_file, second_hop
from interplab.analyses.grafting.deltas import control, graft, load_delta
from interplab.analyses.grafting.evaluate import evaluate
from interplab.analyses.grafting.finetune import FinetuneConfig, finetune
from interplab.analyses.grafting.scores import extractive_scores

__all__ = [
    "Example",
    "FinetuneConfig",
    "control",
    "evaluate",
    "extractive_scores",
    "finetune",
    "first_hop",
    "graft",
    "load_delta",
    "load_task_file",
    "second_hop",
]
