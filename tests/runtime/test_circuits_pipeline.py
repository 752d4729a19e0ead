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
    assert got[graph.first_source(0) : graph.first_source(1), last].abs().sum() > 0


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_edge_patching_equals_single_process(pipelines, stages):
    """Circuits, exact per-edge effects and ACDC evaluated stage by stage equal one process."""
    from interplab.analyses.circuits.evaluate import evaluate
    from interplab.analyses.circuits.scores import acdc, exact

    ref = load_model("tiny-llama")
    pipe = pipelines.get("tiny-llama", stages=stages, micro_batches=2)
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 3, seed=1))
    local, task = prepare(ref, pairs), prepare(pipe, pairs)
    graph = task.graph
    gen = torch.Generator().manual_seed(0)
    circuits = torch.stack([graph.full(), graph.empty()] + [torch.rand(graph.n_sources, graph.n_dests, generator=gen) < p for p in (0.2, 0.8)])
    want = evaluate(local, circuits)
    got = evaluate(task, circuits)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(got[0], task.clean_value.mean(), atol=1e-4)  # full graph: the clean run
    assert torch.allclose(got[1], task.corrupt_value.mean(), atol=1e-4)  # empty graph: the corrupted run
    # one edge per source layer into the last stage's layers and out of the first stage's
    edges = graph.edges[torch.randperm(len(graph.edges), generator=gen)[:12]]
    assert torch.allclose(exact(task, edges), exact(local, edges), atol=1e-4)
    with pytest.raises(ValueError, match="do not belong to stage 0"):
        pipe.stage_forward(0, pairs.clean, None, capture=[f"head_out.{graph.n_layers - 1}"])
    if stages == 2:
        a, b = acdc(task, threshold=0.05), acdc(local, threshold=0.05)
        assert torch.equal(a.circuit, b.circuit) and torch.allclose(a.scores, b.scores, atol=1e-4)


def test_circuit_job_with_faithfulness_on_a_pipeline(pipelines, tmp_path):
    """The circuit job on a 2-stage pipeline writes the same scores, circuit value and MIB CPR/CMD."""
    from interplab.analyses.circuits.job import CircuitRunner
    from interplab.jobs.registry import parse_spec
    from interplab.store import open_store
    from tests.analyses.jobs_inline import run_job

    job = parse_spec({"kind": "circuit", "model": "tiny-llama", "dataset": {"name": "ioi", "n": 3, "seed": 1},
                      "methods": ["eap-ig-inputs"], "circuit": {"size": 20}, "faithfulness": "mib"})
    rows = {}
    for name, model in (("local", load_model("tiny-llama")), ("pipeline", pipelines.get("tiny-llama", stages=2, micro_batches=2))):
        store = open_store(str(tmp_path / name))
        run_id, _ = run_job(CircuitRunner(), "circuit", job, model, store)
        rows[name] = store.sql("SELECT circuit_value, cpr, cmd, clean, corrupted FROM circuit_summary WHERE run_id = $r",
                               {"r": run_id}).to_pylist()[0]
    for key, value in rows["local"].items():
        assert rows["pipeline"][key] == pytest.approx(value, abs=1e-4), key
    assert rows["pipeline"]["circuit_value"] != pytest.approx(rows["pipeline"]["corrupted"], abs=1e-3)
