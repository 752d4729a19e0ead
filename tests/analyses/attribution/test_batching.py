"""Batching is exact: ItP's one-pass attributions, and a pass mixing variants of different sizes
(rows of different lengths under deletion), equal a plain loop of one Hugging Face forward per
variant on an independent copy of the model, with the perturbation written out by hand."""

import pytest
import torch

from interplab.analyses.attribution import Perturber, attribute, build_task

PROMPT = "When Mary and John went to the store, John gave a drink to"
MODES = ["baseline", "zero", "mean", "delete"]
BASELINE = 5  # a token id of the tiny vocabulary


@pytest.fixture(scope="module")
def reference():
    from interplab.models.tiny import build_tiny

    model, _ = build_tiny("llama")
    model.set_attn_implementation("eager")
    return model.eval()


def reference_logprob(hf, prompt_ids, target_ids, removed, mode) -> float:
    """log p(target | prompt with ``removed`` positions perturbed), one HF forward, no interplab."""
    prompt = list(prompt_ids)
    if mode == "delete":
        prompt = [t for p, t in enumerate(prompt) if p not in removed]
    elif mode == "baseline":
        prompt = [BASELINE if p in removed else t for p, t in enumerate(prompt)]
    ids = torch.tensor([prompt + list(target_ids[:-1])])
    with torch.no_grad():
        embeds = hf.model.embed_tokens(ids)
        if mode in ("zero", "mean") and removed:
            fill = torch.zeros(embeds.shape[-1]) if mode == "zero" else embeds[0, : len(prompt)].mean(dim=0)
            embeds = embeds.clone()
            embeds[0, sorted(removed)] = fill
        logits = hf(inputs_embeds=embeds).logits[0]
    start = len(prompt) - 1
    logp = torch.log_softmax(logits[start : start + len(target_ids)].double(), dim=-1)
    return float(sum(logp[j, t] for j, t in enumerate(target_ids)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", [" Mary", " Mary and John"], ids=["one-token", "three-tokens"])
def test_itp_equals_a_loop_of_single_forwards(tiny_models, reference, mode, target):
    model = tiny_models("llama")
    result = attribute(model, PROMPT, target, method="itp", perturbation=mode, baseline_id=BASELINE)
    task = result.task
    assert result.cost.passes == 1 and result.cost.forwards == task.n_units + 1
    base = reference_logprob(reference, task.prompt_ids, task.target_ids, set(), mode)
    assert result.base_logprob == pytest.approx(base, abs=1e-4)
    for u, positions in enumerate(task.units):
        expected = base - reference_logprob(reference, task.prompt_ids, task.target_ids, set(positions), mode)
        assert result.scores.attribution[u] == pytest.approx(expected, abs=1e-4), (u, task.pieces[positions[0]])


@pytest.mark.parametrize("mode", MODES)
def test_a_pass_of_unequal_variants_equals_the_loop(tiny_models, reference, mode):
    """Variants of 0 to 5 units in one pass: deletion gives rows of different lengths (right-padded)."""
    model = tiny_models("llama")
    task = build_task(model.tokenizer, PROMPT, " Mary and John")
    variants = [[], [0], [3, 4, 5, 6, 7], [13], [1, 2], [9, 10, 11]]
    perturber = Perturber(model, task, mode, baseline_id=BASELINE)
    batched = perturber.logprobs(variants)
    assert perturber.cost.passes == 1
    for units, value in zip(variants, batched):
        expected = reference_logprob(reference, task.prompt_ids, task.target_ids, set(task.positions(units)), mode)
        assert value == pytest.approx(expected, abs=1e-4), units


def test_hipe_single_units_equal_itp(tiny_models):
    """What HiPe measured unit by unit (window 1) is ItP's attribution of that unit."""
    model = tiny_models("llama")
    itp = attribute(model, PROMPT, " Mary", method="itp", perturbation="delete")
    hipe = attribute(model, PROMPT, " Mary", method="hipe", perturbation="delete", config=None)
    exact = [u for u, w in enumerate(hipe.scores.window) if w == 1]
    assert exact
    for u in exact:
        assert hipe.scores.attribution[u] == pytest.approx(itp.scores.attribution[u], abs=1e-5)
