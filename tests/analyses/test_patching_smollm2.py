"""SmolLM2-135M with IOI prompts: interplab's resid_pre sweep equals nnsight's, patch by patch.

nnsight runs in a child process (``python -m tests.analyses.test_patching_smollm2``): importing it
mounts ``save`` on ``object`` for the whole process, which breaks every later anyio import there
(Ray Serve replicas and the dashboard's tests share this pytest process)."""

import json
import subprocess
import sys
from pathlib import Path

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


LAYERS = [0, 7, 15, 29]
REPO = Path(__file__).resolve().parents[2]


def nnsight_reference() -> dict[str, float]:
    """The nnsight sweep on the test's pairs, keyed "layer,position" (run in the child process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interplab.models.loading import resolve_source

    source = resolve_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    pairs = PairSet.tokenize(tokenizer, ioi_pairs(tokenizer, 2, seed=0))
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    sweep = nnsight_resid_pre_sweep(hf, tokenizer, pairs, LAYERS, list(range(pairs.clean.seq_len)))
    return {f"{layer},{pos}": value for (layer, pos), value in sweep.items()}


def test_resid_pre_sweep_equals_nnsight():
    from interplab import load_model

    model = load_model("smollm2-135m")
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 2, seed=0))
    result = activation_patching(model, pairs, [Sweep("resid_pre")])
    child = subprocess.run([sys.executable, "-m", "tests.analyses.test_patching_smollm2"], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    reference = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(reference) == len(LAYERS) * pairs.clean.seq_len
    rows = {(r["layer"], r["position"]): r["value"] for r in result.rows}
    for key, value in reference.items():
        layer, pos = map(int, key.split(","))
        assert rows[(layer, pos)] == pytest.approx(value, abs=1e-4), key
    assert result.baselines["clean"] > result.baselines["corrupted"]


if __name__ == "__main__":
    print(json.dumps(nnsight_reference()))
