"""Loading: tiny models are deterministic, safetensors folders load whole or by layer range."""

import pytest
import torch

from interplab import load_model
from tests.conftest import PROMPTS


def test_tiny_models_are_deterministic_per_seed():
    a, b, c = (load_model("tiny-llama", seed=s) for s in (0, 0, 1))
    wa, wb, wc = (m.layer(0).self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs(dtype):
    model = load_model("tiny-llama", dtype=dtype)
    out = model.run(PROMPTS, capture=["z.1", "pattern.1"])
    assert out.logits.dtype == getattr(torch, dtype) and out.cache["z.1"].dtype == getattr(torch, dtype)
    assert torch.isfinite(out.logits).all()


@pytest.fixture
def saved_model(tmp_path, family):
    from interplab.models.tiny import build_tiny

    model, tokenizer = build_tiny(family)
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    return tmp_path / family


def test_directory_load_equals_tiny(saved_model, tiny_models, family):
    loaded = load_model(str(saved_model))
    reference = tiny_models(family)
    assert len(loaded.weight_hash) == 16
    batch = reference.tokenize(PROMPTS)  # same ids for both: this checks the weights
    torch.testing.assert_close(loaded.run(batch).logits, reference.run(batch).logits, rtol=0, atol=1e-6)


def test_stages_hold_only_their_layers_and_chain_to_the_full_model(saved_model, tiny_models, family):
    full = tiny_models(family)
    batch = full.tokenize(PROMPTS)
    expected = full.run(batch).logits
    first = load_model(str(saved_model), layers=(0, 1), with_embed=True, with_head=False)
    second = load_model(str(saved_model), layers=(1, 3), with_embed=False, with_head=True)
    assert first.layer(2).get_submodule(first.spec.o_proj).weight.device.type == "meta"
    assert second.layer(0).get_submodule(second.spec.o_proj).weight.device.type == "meta"
    hidden, _ = first.run_stage(batch, start=0, stop=1)
    logits, cache = second.run_stage(batch, start=1, stop=3, hidden=hidden, with_head=True, capture=["resid_pre.1"])
    torch.testing.assert_close(cache["resid_pre.1"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
