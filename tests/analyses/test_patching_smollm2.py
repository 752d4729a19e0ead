"""SmolLM2-135M with IOI prompts: interplab's resid_pre sweep equals nnsight's, patch by patch."""

import pytest
import torch

from interplab.analyses.patching import Sweep, activation_patching
from interplab.analyses.tasks import PairSet, ioi_pairs

pytestmark = pytest.mark.slow


def nnsight_resid_pre_sweep(hf_model, tokenizer, pairs: PairSet, layers, positions):
    """The nnsight way: one trace per patch (clean layer input copied into the corrupted run)."""
    from nnsight import LanguageModel

    lm = LanguageModel(hf_model, tokenizer=tokenizer)
    clean_ids, corrupt_ids = pairs.clean.input_ids, pairs.corrupted.input_ids
    out = {}
    with torch.no_grad():
        clean = []
        for layer in layers:  # nnsight runs the trace body itself: keep it to plain statements
            with lm.trace(clean_ids):
                saved = lm.model.layers[layer].input.save()
            clean.append(saved)
        for li, layer in enumerate(layers):
            for pos in positions:
                with lm.trace(corrupt_ids):
                    lm.model.layers[layer].input[:, pos] = clean[li][:, pos]
                    logits = lm.lm_head.output[:, -1].save()
                diff = logits.gather(1, pairs.answer[:, None]) - logits.gather(1, pairs.wrong[:, None])
                out[(layer, pos)] = float(diff.mean())
    return out


def test_resid_pre_sweep_equals_nnsight():
    from transformers import AutoModelForCausalLM

    from interplab import load_model
    from interplab.models.loading import resolve_source

    model = load_model("smollm2-135m")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 2, seed=0))
    result = activation_patching(model, pairs, [Sweep("resid_pre")])
    hf = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m"), dtype=torch.float32).eval()
    layers, positions = [0, 7, 15, 29], list(range(pairs.clean.seq_len))
    reference = nnsight_resid_pre_sweep(hf, model.tokenizer, pairs, layers, positions)
    rows = {(r["layer"], r["position"]): r["value"] for r in result.rows}
    for key, value in reference.items():
        assert rows[key] == pytest.approx(value, abs=1e-4), key
    assert result.baselines["clean"] > result.baselines["corrupted"]
