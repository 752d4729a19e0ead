"""Circuit scores through the Ray shard runtime: gradients cross stages, scores equal one process."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.analyses.circuits.scores import score_edges
from interplab.analyses.circuits.task import prepare
from interplab.analyses.tasks import PairSet, ioi_pairs

pytestmark = pytest.mark.slow  # real Ray actors


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations"])
def test_pipeline_scores_equal_single_process(pipelines, method):
    ref = load_model("tiny-llama")
    pipe = pipelines.get("tiny-llama", stages=2, micro_batches=2)
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 3, seed=1))
    want = score_edges(prepare(ref, pairs), method, ig_steps=2)
    task = prepare(pipe, pairs)
    assert torch.allclose(task.clean_sources, prepare(ref, pairs).clean_sources, atol=1e-5)
    got = score_edges(task, method, ig_steps=2)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # edges from layer 0 (first stage) into the last layer (second stage) carry gradient
    graph = task.graph
    assert pipe.stage_ranges[0][1] <= graph.n_layers - 1
    last = slice(graph.qkv_dest(graph.n_layers - 1, 0, "q"), graph.n_dests)
    assert got[1 : 1 + graph.n_heads + 1, last].abs().sum() > 0


def test_pipeline_refuses_edge_patching_evaluation(pipelines):
    from interplab.analyses.circuits.evaluate import evaluate

    pipe = pipelines.get("tiny-llama", stages=2, micro_batches=2)
    pairs = PairSet.tokenize(pipe.tokenizer, ioi_pairs(pipe.tokenizer, 2, seed=1))
    task = prepare(pipe, pairs)
    with pytest.raises(TypeError, match="one process"):
        evaluate(task, task.graph.full())
