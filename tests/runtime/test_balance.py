"""A job's pipeline is split by the work its analysis declares (``parallel.balance``)."""

from __future__ import annotations

import pytest

from interplab.analyses.patching.job import PatchingRunner
from interplab.jobs.model import build_model
from interplab.jobs.registry import parse_spec
from interplab.runtime.split import LayerWork

SPEC = {
    "kind": "patching",
    "model": "tiny-llama",
    "prompts": [{"clean": "a b c d", "corrupted": "a b d d", "answer": " c", "wrong": " d"}],
    "sweep": "resid_pre",
}


@pytest.mark.parametrize("balance, expected", [("work", [(0, 1), (1, 3)]), ("layers", [(0, 2), (2, 3)])])
def test_a_patching_job_pipeline_is_balanced_by_its_layer_work(ray_cluster, monkeypatch, balance, expected):
    declared = []

    def skewed(self, spec, model):  # tiny models have 3 layers, where l + 1 splits like layers do
        declared.append((spec.kind, model.n_layers))
        return LayerWork((5.0, 1.0, 1.0))

    monkeypatch.setattr(PatchingRunner, "layer_work", skewed)
    spec = parse_spec({**SPEC, "parallel": {"stages": 2, "balance": balance, "cpus_per_stage": 0.1}})
    pipe = build_model(spec, "cpu")
    try:
        assert pipe.stage_ranges == expected
        assert declared == [("patching", 3)]
    finally:
        pipe.close()
