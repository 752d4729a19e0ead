"""Circuit discovery against plain references: edge patching and EAP recomputed by hand, planted
circuits every method must find, extraction, faithfulness and the MIB export."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.analyses.circuits import extract
from interplab.analyses.circuits.evaluate import evaluate
from interplab.analyses.circuits.faithfulness import cpr_cmd, faithfulness_curve, mib_sizes, read_mib, write_mib
from interplab.analyses.circuits.graph import CircuitGraph, Dest, GraphError, Node, circuit_families
from interplab.analyses.circuits.scores import METHODS, acdc, score_edges
from interplab.analyses.circuits.task import prepare
from interplab.analyses.tasks import PairSet, ioi_pairs
from interplab.engine.sites import Site, SiteKind
from interplab.models.arch import registered_archs
from tests.analyses.circuit_reference import auroc, graph_forward, layout, logit_diff, mib_names, reads_after_write
from tests.analyses.planted import planted_gpt2


@pytest.fixture(scope="module")
def gpt2_task():
    model = load_model("tiny-gpt2")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 3, seed=1))
    assert pairs.same_length  # the reference runs without padding
    return prepare(model, pairs)


@pytest.fixture(scope="module")
def planted():
    model, edges = planted_gpt2()
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 4, seed=1))
    return prepare(model, pairs), edges


def test_edge_counts():
    assert CircuitGraph(12, 12).n_edges == 32491  # GPT-2 small, as in EAP-IG/MIB
    assert CircuitGraph(30, 9).n_edges == 123211  # SmolLM2-135M
    # parallel attention/MLP: an MLP does not read its own layer's heads
    seq, par = CircuitGraph(2, 2), CircuitGraph(2, 2, parallel=True)
    assert seq.n_edges - par.n_edges == 2 * 2
    names = CircuitGraph(1, 2).dest_names
    assert names == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0", "logits"]


def test_layout_matches_reference_order():
    graph = CircuitGraph(3, 4)
    heads, mlps, dests = layout(3, 4)
    assert all(graph.head_source(l, h) == i for (l, h), i in heads.items())
    assert all(graph.mlp_source(l) == i for l, i in mlps.items())
    assert graph.qkv_dest(2, 1, "k") == dests[(2, 1, "k")] and graph.logits_dest == dests["logits"]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_nodes_round_trip_through_their_names(parallel):
    """Every node, destination and edge of a small graph: its name is the MIB name the reference
    writes, parses back to the same value, and maps back to the same index."""
    graph = CircuitGraph(3, 4, parallel=parallel)
    ref_sources, ref_dests = mib_names(3, 4)
    assert graph.source_names == ref_sources and graph.dest_names == ref_dests
    assert graph.node_names == ref_sources + ["logits"]
    for i, node in enumerate(graph.sources):
        assert Node.parse(str(node)) == node and graph.source_index(node) == i and graph.node_index(node) == i
    for j, dest in enumerate(graph.dests):
        assert Dest.parse(str(dest)) == dest and graph.dest_index(dest) == j
        assert int(graph.dest_owner[j]) == graph.node_index(dest.node)
        assert graph.dest_layer(j) == (graph.n_layers if dest.node.kind == "logits" else dest.node.layer)
    want = torch.tensor([[reads_after_write(u, v, parallel) for v in ref_dests] for u in ref_sources])
    assert torch.equal(graph.allowed, want)
    for src, dst in graph.edges.tolist():
        assert graph.parse_edge(graph.edge_name(src, dst)) == (src, dst)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a1", "cannot parse circuit node"),
        ("h1.a0", "cannot parse circuit node"),
        ("a0.h1<x>", "q, k or v input"),
        ("a0.h1", "q, k or v input"),  # as a destination a head needs its input
        ("m0<q>", "only heads have q/k/v inputs"),
        ("input", "reads nothing"),
    ],
)
def test_bad_destination_names_say_what_is_allowed(text, message):
    with pytest.raises(GraphError, match=message):
        Dest.parse(text)


def test_bad_edges_are_refused():
    graph = CircuitGraph(3, 4)
    with pytest.raises(GraphError, match="not an edge"):
        graph.parse_edge("a2.h0->a1.h0<q>")  # a1 reads before a2 writes
    with pytest.raises(GraphError, match="layer 5 out of range"):
        graph.parse_edge("a5.h0->logits")
    with pytest.raises(GraphError, match="not a source"):
        graph.parse_edge("logits->m2")
    with pytest.raises(GraphError, match="expected '<source>-><destination>'"):
        graph.parse_edge("a0.h0")
    with pytest.raises(GraphError, match="needs a non-negative integer head"):
        Node("head", 0)


def test_site_groups_partition_sources_and_destinations():
    """Each engine site the graph reads or writes covers a contiguous block of sources (destinations),
    the blocks tile them in order, and per-head sites cover one index per head."""
    graph = CircuitGraph(3, 4)
    for groups, total in ((graph.source_groups, graph.n_sources), (graph.dest_groups, graph.n_dests)):
        assert [i for block in groups.values() for i in block] == list(range(total))
        for site, block in groups.items():
            assert len(block) == (graph.n_heads if site.kind.per_head else 1), site
    for site, block in graph.source_groups.items():
        assert {graph.sources[i].layer for i in block} == {site.layer}
    for site, block in graph.dest_groups.items():
        dests = [graph.dests[i] for i in block]
        assert {d.qkv for d in dests} == {site.kind.qkv}
        logits = dests[0].node.kind == "logits"
        assert {d.node.layer for d in dests} == ({None} if logits else {site.layer})
    assert list(graph.source_groups)[:3] == [Site("embed"), Site("head_out", 0), Site("mlp_out", 0)]
    assert list(graph.dest_groups)[:4] == [Site(k, 0) for k in (SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN, SiteKind.MLP_IN)]
    assert list(graph.dest_groups)[-1] == Site("resid_post", graph.n_layers - 1)
    assert sum(len(graph.layer_dests(layer)) for layer in range(graph.n_layers + 1)) == graph.n_dests
    assert graph.sources_per_layer == 5 and graph.dests_per_layer == 13


def test_supported_families_come_from_the_model_registry(tiny_models):
    """The graph is built exactly for the registered families whose models have per-head and MLP
    input sites; the others are refused with the post-norm reason and the list of supported ones."""
    families = circuit_families()
    assert families == sorted(families) and {"gpt2", "llama"} <= set(families)
    for name in registered_archs():
        model = tiny_models(name)
        has_inputs = all(Site(kind, 0) in model.sites() for kind in SiteKind if kind.split_input or kind == SiteKind.MLP_IN)
        assert (name in families) == has_inputs, name
        if name in families:
            assert CircuitGraph.of(model) == CircuitGraph(model.n_layers, model.n_heads, parallel=not model.has_resid_mid)
        else:
            with pytest.raises(GraphError, match="post-norm.*" + ", ".join(families)):
                CircuitGraph.of(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_full_and_empty_graph(family):
    model = load_model(f"tiny-{family}")
    task = prepare(model, PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 3, seed=2)))
    graph = task.graph
    full, empty = evaluate(task, torch.stack([graph.full(), graph.empty()]))
    assert torch.allclose(full, task.clean_value.mean(), atol=1e-4)
    assert torch.allclose(empty, task.corrupt_value.mean(), atol=1e-4)


def _reference_metric(task, patched):
    hf = task.model.model
    ids, cids = task.pairs.clean.input_ids, task.pairs.corrupted.input_ids
    with torch.no_grad():
        _, corrupt, _ = graph_forward(hf, cids)
        logits, _, _ = graph_forward(hf, ids, corrupt=corrupt, patched=patched)
    return logit_diff(logits, task.pairs.answer, task.pairs.wrong).mean()


def test_edge_patching_matches_plain_recomputation(gpt2_task):
    graph = gpt2_task.graph
    gen = torch.Generator().manual_seed(0)
    circuits = [graph.allowed & (torch.rand(graph.n_sources, graph.n_dests, generator=gen) < p) for p in (0.1, 0.5, 0.9)]
    got = evaluate(gpt2_task, torch.stack(circuits))
    for circuit, value in zip(circuits, got):
        want = _reference_metric(gpt2_task, graph.allowed & ~circuit)
        assert value == pytest.approx(float(want), abs=1e-4)


def test_exact_scores_match_per_edge_recomputation(gpt2_task):
    graph = gpt2_task.graph
    scores = score_edges(gpt2_task, "exact")
    full = _reference_metric(gpt2_task, graph.empty())
    gen = torch.Generator().manual_seed(1)
    for i in torch.randperm(graph.n_edges, generator=gen)[:12].tolist():
        src, dst = graph.edges[i].tolist()
        patched = graph.empty()
        patched[src, dst] = True
        want = float(full - _reference_metric(gpt2_task, patched))
        assert float(scores[src, dst]) == pytest.approx(want, abs=1e-4), graph.edge_name(src, dst)
    assert bool((scores[~graph.allowed] == 0).all())


def test_eap_matches_autograd(gpt2_task):
    task = gpt2_task
    hf = task.model.model
    graph = task.graph
    with torch.no_grad():
        _, corrupt, _ = graph_forward(hf, task.pairs.corrupted.input_ids)
    with torch.enable_grad():
        logits, clean, inputs = graph_forward(hf, task.pairs.clean.input_ids)
        metric = logit_diff(logits, task.pairs.answer, task.pairs.wrong).mean()
        dests = sorted(inputs)
        grads = torch.autograd.grad(metric, [inputs[d] for d in dests])
    want = torch.zeros(graph.n_sources, graph.n_dests)
    for dest, g in zip(dests, grads):
        for src in range(graph.upstream(dest)):
            want[src, dest] = -((corrupt[src] - clean[src]).detach() * g).sum()
    got = score_edges(task, "eap")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_ig_with_one_step_at_corrupted_input_is_eap_there(gpt2_task):
    # eap-ig-inputs with 1 step evaluates the gradient at alpha = 0 (the corrupted input);
    # clean-corrupted averages the clean and corrupted gradients
    task = gpt2_task
    ig1 = score_edges(task, "eap-ig-inputs", ig_steps=1)
    cc = score_edges(task, "clean-corrupted")
    eap = score_edges(task, "eap")
    assert torch.allclose(cc, (eap + ig1) / 2, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_planted_circuit_ranked_first(planted, method):
    task, edges = planted
    graph = task.graph
    scores = score_edges(task, method, acdc_threshold=0.05)
    names = [graph.edge_name(s, d) for s, d in graph.edges.tolist()]
    positive = torch.tensor([n in edges for n in names])
    values = scores[graph.edges[:, 0], graph.edges[:, 1]]
    assert auroc(values.abs(), positive) >= 0.95


def test_acdc_finds_the_planted_circuit(planted):
    task, edges = planted
    graph = task.graph
    result = acdc(task, threshold=0.05)
    kept = {graph.edge_name(s, d) for s, d in extract.prune(graph, result.circuit).nonzero().tolist()}
    assert kept == edges
    assert evaluate(task, result.circuit) == pytest.approx(float(task.clean_value.mean()), abs=0.1)


def test_extraction_rules():
    graph = CircuitGraph(3, 2)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_sources, graph.n_dests, generator=gen) * graph.allowed
    top = extract.top_n(graph, scores, 10)
    assert int(top.sum()) == 10 and float(scores[top].min()) >= float(scores[graph.allowed & ~top].max())
    by_abs = extract.top_n(graph, scores, 10, absolute=True)
    assert float(scores[by_abs].abs().min()) >= float(scores[graph.allowed & ~by_abs].abs().max())
    assert bool((extract.threshold(graph, scores, 0.5) == (graph.allowed & (scores >= 0.5))).all())
    grown = extract.greedy(graph, scores, 15)
    assert int(grown.sum()) == 15
    # every greedy edge ends in the logits or in a node that already has an outgoing edge
    for src, dst in grown.nonzero().tolist():
        node = graph.dests[dst].node
        if node.kind != "logits":
            assert bool(grown[graph.source_index(node)].any())


def test_prune_drops_dangling_edges():
    graph = CircuitGraph(2, 1)
    mask = graph.empty()
    a0, m0, a1 = graph.head_source(0, 0), graph.mlp_source(0), graph.head_source(1, 0)
    mask[0, graph.qkv_dest(0, 0, "v")] = True  # input -> a0.h0
    mask[a0, graph.logits_dest] = True  # a0.h0 -> logits: a path
    mask[m0, graph.logits_dest] = True  # m0 has no input edge: dangling
    mask[0, graph.qkv_dest(1, 0, "q")] = True  # input -> a1.h0, which reaches nothing
    pruned = extract.prune(graph, mask)
    assert {graph.edge_name(s, d) for s, d in pruned.nonzero().tolist()} == {"input->a0.h0<v>", "a0.h0->logits"}
    assert a1  # names used above


def test_faithfulness_curve_and_mib(planted, tmp_path):
    task, _ = planted
    graph = task.graph
    scores = score_edges(task, "exact")
    curve = faithfulness_curve(task, scores, sizes=[1, 4, graph.n_edges])
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.faithfulness[1] == pytest.approx(1.0, abs=0.05)  # the four planted edges suffice
    cpr, cmd, signed, absolute = cpr_cmd(task, scores)
    assert signed.sizes == mib_sizes(graph) and 0.9 < cpr <= 1.01 and 0 <= cmd < 0.1
    mask = extract.top_n(graph, scores, 4)
    path = write_mib(tmp_path / "exact.json", graph, scores, mask)
    graph2, scores2, mask2 = read_mib(path)
    assert graph2 == graph and torch.allclose(scores2, scores * graph.allowed) and torch.equal(mask2, mask)
