"""Grafting arithmetic (exact, parameter by parameter), weights on both backends, finetuning and deltas."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.analyses.grafting import deltas as D
from interplab.analyses.grafting.data import examples_from_records, load_task_file
from interplab.analyses.grafting.finetune import FinetuneConfig, batches, finetune, training_batch
from interplab.analyses.grafting.weights import get_weights, layer_of, set_weights
from interplab.store import open_store

from pathlib import Path

FACTS = load_task_file(Path(__file__).with_name("tiny_facts.yaml"))


def noisy(weights, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: v + torch.randn(v.shape, generator=gen) for n, v in weights.items()}


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def test_graft_and_control_are_exact_parameter_by_parameter(llama):
    theta = get_weights(llama)
    w_f, w_fi, w_fp, w_i = (noisy(theta, s) for s in (1, 2, 3, 4))
    graft = D.graft(w_fp, w_fi, w_f)
    control = D.control(w_fp, w_i, theta)
    for name in theta:
        assert torch.equal(graft[name], w_fp[name] + (w_fi[name] - w_f[name])), name
        assert torch.equal(control[name], w_fp[name] + (w_i[name] - theta[name])), name
    late = D.graft(w_fp, w_fi, w_f, keep=D.in_layers(llama, (2, 3)))
    for name in theta:
        if layer_of(llama, name) == 2:
            assert torch.equal(late[name], graft[name]), name
        else:  # embeddings, final norm, layers 0-1: W_{F'} untouched
            assert torch.equal(late[name], w_fp[name]), name
    assert any(layer_of(llama, n) is None for n in theta)  # the check above covered non-layer params


def test_set_weights_loads_a_graft_exactly(llama):
    theta = get_weights(llama)
    graft = D.graft(noisy(theta, 5), noisy(theta, 6), noisy(theta, 7))
    try:
        set_weights(llama, graft)
        for name, param in llama.model.named_parameters():
            assert torch.equal(param.detach(), graft[name]), name
        assert llama.model.lm_head.weight is llama.model.model.embed_tokens.weight  # still tied
    finally:
        set_weights(llama, theta)


def test_loss_is_on_answer_tokens_only(llama):
    examples = examples_from_records({"F": [{"prompt": "Mary lives in", "answer": " Paris"},
                                            {"prompt": "The people in the city John is from speak", "answer": " English"}]})["F"]
    batch, loss = training_batch(llama.tokenizer, examples)
    labels = loss.labels
    assert (labels != -100).sum(1).tolist() == [1, 1]
    paris = llama.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert labels[0, 2] == paris and batch.input_ids[0, 3] == paris  # position 2 ('in') predicts ' Paris'
    logits = llama.run(batch).logits
    want = torch.nn.functional.cross_entropy(torch.stack([logits[0, 2], logits[1, 8]]), labels[[0, 1], [2, 8]])
    torch.testing.assert_close(loss(logits, batch), want)


def test_batches_cover_every_example_once_per_epoch():
    config = FinetuneConfig(batch_size=3, seed=4)
    for epoch in (1, 2):
        rows = [i for b in batches(10, config, epoch) for i in b]
        assert sorted(rows) == list(range(10))
    assert batches(10, config, 1) != batches(10, config, 2)


def test_freezing_leaves_other_layers_untouched(llama):
    theta = get_weights(llama)
    try:
        finetune(llama, FACTS["F"], FinetuneConfig(lr=1e-2, epochs=1, batch_size=2), layers=(1, 2))
        after = get_weights(llama)
        changed = {n for n in theta if not torch.equal(theta[n], after[n])}
        assert changed and all(layer_of(llama, n) == 1 for n in changed)
        assert all(p.requires_grad for p in llama.model.parameters())  # restored after training
    finally:
        set_weights(llama, theta)


def test_finetune_learns_the_facts(llama):
    from interplab.analyses.grafting.evaluate import evaluate

    theta = get_weights(llama)
    try:
        before = evaluate(llama, FACTS["F"])
        log = finetune(llama, FACTS["F"], FinetuneConfig(lr=1e-2, epochs=8, batch_size=5))
        after = evaluate(llama, FACTS["F"])
        assert after.mean_rank == 0 and after.mean_logprob > before.mean_logprob
        assert log.steps[-1][1] < log.steps[0][1]
    finally:
        set_weights(llama, theta)


def test_delta_round_trips_through_the_store_as_safetensors(tmp_path, llama):
    theta = get_weights(llama)
    delta = D.subtract(noisy(theta, 8), theta)
    store = open_store(str(tmp_path / "store"))
    with store.begin_run("grafting", model="tiny-llama", spec={}) as writer:
        from interplab.analyses.grafting.tables import deltas_table

        row = D.save_delta(writer, "W_F-theta.c0", delta, {"experiment": "grafting", "delta": "W_F-theta"})
        writer.write_table("deltas", deltas_table([row]), chunk="c0")
        run_id = writer.run_id
    path = tmp_path / "store" / row["path"]
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    back = D.load_delta(store, run_id, "W_F-theta.c0")
    assert set(back) == set(delta) and all(torch.equal(back[n], delta[n]) for n in delta)
    info = store.sql("SELECT n_params, bytes FROM deltas WHERE run_id = $r", {"r": run_id}).to_pylist()[0]
    assert info["n_params"] == sum(v.numel() for v in delta.values()) and info["bytes"] == path.stat().st_size
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        D.load_delta(store, run_id, "W_F-theta.c0")


@pytest.mark.slow
def test_pipeline_finetune_equals_single_process(ray_cluster):
    """Two stages, tied embeddings split across them, layer 0 and the embeddings frozen: the same trained
    weights (1e-5). Adam's ε is 1e-4 as in the runtime's own test: with ε = 1e-8 a parameter whose
    gradient is ~1e-9 moves by ±lr on float32 rounding of the micro-batch sums alone."""
    from interplab.runtime import ParallelConfig
    from interplab.runtime.pipeline import PipelineModel

    config = FinetuneConfig(lr=1e-3, epochs=2, batch_size=3, seed=1, adam_eps=1e-4)
    local = load_model("tiny-llama")
    theta = get_weights(local)
    with PipelineModel("tiny-llama", ParallelConfig(stages=2, micro_batches=2)) as pipe:
        assert pipe.stage_ranges == [(0, 1), (1, 3)] or len(pipe.stage_ranges) == 2
        for layers in (None, (1, 3)):
            set_weights(local, theta)
            set_weights(pipe, theta)
            want_log = finetune(local, FACTS["F"] + FACTS["ImplF"], config, layers=layers)
            got_log = finetune(pipe, FACTS["F"] + FACTS["ImplF"], config, layers=layers)
            for (_, a), (_, b) in zip(want_log.steps, got_log.steps):
                assert a == pytest.approx(b, abs=1e-5)
            want, got = get_weights(local), get_weights(pipe)
            assert set(want) == set(got)
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
            if layers is not None:
                frozen = [n for n in theta if layer_of(local, n) != 1 and layer_of(local, n) != 2]
                assert all(torch.equal(got[n], theta[n]) for n in frozen)
        graft = D.graft(noisy(theta, 1), noisy(theta, 2), noisy(theta, 3))
        set_weights(pipe, graft)
        back = get_weights(pipe)
        assert all(torch.equal(back[n], graft[n]) for n in graft)
        parts = pipe.stage_parameters()
        assert torch.equal(parts["lm_head.weight"], graft["model.embed_tokens.weight"])  # the head copy too
