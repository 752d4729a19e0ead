"""SmolLM2-135M: batched ItP equals one Hugging Face forward per variant; HiPe's unit-by-unit
measurements equal ItP's and agree on the most important token."""

import pytest
import torch

from interplab.analyses.attribution import attribute

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


def test_itp_equals_hf_loop_and_hipe_agrees():
    from transformers import AutoModelForCausalLM

    from interplab import load_model
    from interplab.models.loading import resolve_source

    model = load_model("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m"), dtype=torch.float32).eval()
    itp = attribute(model, PROMPT, " Paris", method="itp", perturbation="mean")
    task = itp.task
    ids = torch.tensor([list(task.prompt_ids)])
    with torch.no_grad():
        embeds = hf.model.embed_tokens(ids)
        mean = embeds[0].mean(dim=0)

        def logprob(removed: int | None) -> float:
            e = embeds.clone()
            if removed is not None:
                e[0, removed] = mean
            logits = hf(inputs_embeds=e).logits[0, -1]
            return float(torch.log_softmax(logits.double(), dim=-1)[task.target_ids[0]])

        base = logprob(None)
        assert itp.base_logprob == pytest.approx(base, abs=2e-3)
        for u in range(task.n_units):
            assert itp.scores.attribution[u] == pytest.approx(base - logprob(u), abs=2e-3), task.pieces[u]
    hipe = attribute(model, PROMPT, " Paris", method="hipe", perturbation="mean")
    exact = [u for u in range(task.n_units) if hipe.scores.window[u] == 1]
    for u in exact:
        assert hipe.scores.attribution[u] == pytest.approx(itp.scores.attribution[u], abs=1e-3)
    top = max(range(task.n_units), key=lambda u: itp.scores.attribution[u])
    assert top in exact and max(exact, key=lambda u: hipe.scores.attribution[u]) == top
