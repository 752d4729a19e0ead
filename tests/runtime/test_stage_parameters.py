"""Setting weights on pipeline stages and training a subset of parameters (``trainable``).

A 2-stage tiny Llama splits its tied embedding: the first stage holds the embedding, the last a
separate copy as the head. Setting a value must reach both copies; training a subset must equal the
single-process trainer (1e-5) and leave every other parameter bit for bit as it was.
"""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.runtime import AdamConfig, ParallelConfig, make_trainer
from interplab.runtime.errors import StageError
from interplab.runtime.stage import StageSpec, StageWorker
from tests.runtime.helpers import CLEAN, CORRUPT, next_token_loss

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TOL = {"rtol": 1e-5, "atol": 1e-5}
STEPS = [CLEAN, CORRUPT + ["Mary lives in"], ["The city of Paris is in France", *CLEAN]]


def noisy(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: v + torch.randn(v.shape, generator=gen) for n, v in weights.items()}


def layer_names(model, layer: int) -> list[str]:
    return [n for n, _ in model.model.named_parameters() if n.startswith(f"model.layers.{layer}.")]


@pytest.fixture(scope="module")
def pipe(ray_cluster):
    from interplab.runtime.pipeline import PipelineModel

    with PipelineModel("tiny-llama", ParallelConfig(stages=2, micro_batches=2)) as pipe:
        assert pipe.stage_ranges == [(0, 2), (2, 3)]  # the cases below rely on this split
        yield pipe


@pytest.fixture(scope="module")
def theta():
    model = load_model("tiny-llama")
    return {n: p.detach().clone() for n, p in model.model.named_parameters()}


# ------------------------------------------------------------------ StageWorker alone (no Ray)
def test_worker_sets_its_own_parameters_and_names_an_unknown_one():
    worker = StageWorker(StageSpec(1, 2, 3, 3, 2, "tiny-llama"))  # the last stage: layer 2, norm, head
    owned = worker.parameter_names()
    assert HEAD in owned and EMBED not in owned and not any(n.startswith(("model.layers.0.", "model.layers.1.")) for n in owned)
    value = torch.randn(worker.parameters()[HEAD].shape)
    assert worker.set_parameters({EMBED: value}) == 1  # the embedding's name reaches the head copy
    assert torch.equal(worker.parameters()[HEAD], value)
    before = worker.parameters()
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"unknown parameter '{name}'") as info:
        worker.set_parameters({"model.norm.weight": torch.zeros_like(before["model.norm.weight"]), name: torch.zeros(1)})
    assert all(torch.equal(v, before[n]) for n, v in worker.parameters().items())  # nothing written
    assert isinstance(getattr(info.value, "stage_error", None), StageError)  # marked with where it happened
    with pytest.raises(ValueError, match="one tied parameter"):
        worker.set_parameters({EMBED: value, HEAD: value + 1})


@pytest.mark.parametrize("name", [EMBED, HEAD])
def test_whole_model_stage_trains_the_tied_embedding_under_either_name(name):
    worker = StageWorker(StageSpec(0, 0, 3, 3, 1, "tiny-llama"))  # one stage: embedding and head are one tensor
    owned = worker.params.owned()
    assert owned[EMBED] is owned[HEAD]
    assert worker.init_optimizer(AdamConfig(), [name, "model.norm.weight"]) == 2
    assert owned[EMBED].requires_grad and owned["model.norm.weight"].requires_grad
    assert not any(p.requires_grad for n, p in owned.items() if n not in (EMBED, HEAD, "model.norm.weight"))
    worker.release_optimizer()
    assert all(p.requires_grad for p in owned.values())


# ------------------------------------------------------------------ set_parameters on 2 stages
def test_set_parameters_round_trip_with_tied_embeddings(pipe, theta):
    values = noisy(theta, 1)
    assert pipe.set_parameters(values) == len(values)
    got = pipe.stage_parameters()
    assert set(got) == set(values) | {HEAD}
    for name, value in values.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(got[HEAD], values[EMBED])  # the last stage's copy of the tied embedding

    head = torch.randn(values[EMBED].shape)
    pipe.set_parameters({HEAD: head})  # either name sets both copies
    got = pipe.stage_parameters()
    assert torch.equal(got[EMBED], head) and torch.equal(got[HEAD], head)

    with pytest.raises(ValueError, match="unknown parameter 'model.layers.7.mlp.up_proj.weight'"):
        pipe.set_parameters({"model.norm.weight": torch.zeros(1), "model.layers.7.mlp.up_proj.weight": torch.zeros(1)})
    assert torch.equal(pipe.stage_parameters()["model.norm.weight"], values["model.norm.weight"])  # nothing written
    pipe.set_parameters(theta)
    assert all(torch.equal(v, theta[n]) for n, v in pipe.stage_parameters().items() if n != HEAD)


# ------------------------------------------------------------------ training a subset
CASES = {
    # layer 1 (first stage) and the tied embedding, named by the head: both stages train, both copies
    "layer1+head": lambda m: layer_names(m, 1) + [HEAD],
    # first stage only: the last stage trains nothing but must still pass gradients back
    "layer0": lambda m: layer_names(m, 0),
    # last stage only: the first stage is entirely frozen (no backward runs there)
    "layer2+norm": lambda m: layer_names(m, 2) + ["model.norm.weight"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_training_a_subset_equals_single_process(pipe, theta, case):
    local = load_model("tiny-llama")
    trainable = CASES[case](local)
    pipe.set_parameters(theta)
    adam = AdamConfig(lr=1e-2, eps=1e-4)  # ε as in test_equivalence: float32 noise on ~0 gradients
    with make_trainer(local, adam, trainable=trainable) as want_trainer, make_trainer(pipe, adam, trainable=trainable) as got_trainer:
        for prompts in STEPS:
            torch.testing.assert_close(got_trainer.step(prompts, next_token_loss), want_trainer.step(prompts, next_token_loss), **TOL)
        frozen = [n for n, p in local.model.named_parameters() if not p.requires_grad]
    assert all(p.requires_grad for p in local.model.parameters())  # given back on close
    want = {n: p.detach() for n, p in local.model.named_parameters(remove_duplicate=False)}
    got = pipe.stage_parameters()
    trained = {n for n in want if not torch.equal(want[n], theta[n if n != HEAD else EMBED])}
    assert trained and trained <= set(trainable) | ({EMBED, HEAD} if {EMBED, HEAD} & set(trainable) else set())
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert frozen and set(frozen).isdisjoint(trainable)
    for name in frozen:
        assert torch.equal(got[name], theta[name]), name  # bit-identical on the pipeline
        assert torch.equal(want[name], theta[name]), name
    assert torch.equal(got[HEAD], got[EMBED])  # the two copies of the tied embedding agree


def test_bad_trainable_is_one_clear_error(pipe):
    local = load_model("tiny-llama")
    for backend in (local, pipe):
        with pytest.raises(ValueError, match="unknown parameter 'model.layers.9.mlp.up_proj.weight'"):
            make_trainer(backend, AdamConfig(), trainable=["model.norm.weight", "model.layers.9.mlp.up_proj.weight"])
        with pytest.raises(ValueError, match="trainable is empty"):
            make_trainer(backend, AdamConfig(), trainable=[])
    assert all(p.requires_grad for p in local.model.parameters())
