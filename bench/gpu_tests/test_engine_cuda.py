"""The single-process engine on CUDA equals the same engine on CPU: forward passes with captures and
interventions, gradients, patching sweeps, circuit scores, training steps, generation, store captures,
on every tiny model family (float32 both sides; the CPU engine is itself tested against transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_helpers import CLEAN, CORRUPT, DEVICE, FAMILIES, PROMPTS, TOL, cpu, logit_diff, next_token_loss, sites_of
from interplab import load_model
from interplab.engine import AdamConfig, Intervention, patch, steer, zero


@pytest.fixture(params=FAMILIES)
def pair(request):
    """(CPU model, the same model on the device under test)."""
    name = f"tiny-{request.param}"
    return load_model(name), load_model(name, device=DEVICE)


def test_models_are_on_the_device(pair):
    _, dev = pair
    assert dev.device.type == DEVICE


def test_run_with_captures_and_interventions(pair):
    ref, dev = pair
    sites = sites_of(ref)
    value = torch.full((ref.d_model,), 0.1)
    source = ref.run(CLEAN, capture=["resid_pre.1"]).cache["resid_pre.1"]
    interventions = [
        steer("resid_post.0", value, 2.0),
        zero("z.1.2"),
        patch("resid_pre.1", source, positions=[0, 1]),
        Intervention("resid_pre.2", "add", value=value),
    ]
    for positions, values_on in ((None, "cpu"), ([-1], "cpu"), (None, DEVICE)):  # values on CPU are moved by the engine
        want = ref.run(CORRUPT, capture=sites, interventions=interventions, positions=positions)
        got = dev.run(CORRUPT, capture=sites, interventions=[_to(i, values_on) for i in interventions], positions=positions)
        torch.testing.assert_close(cpu(got.logits), want.logits, **TOL)
        for site in sites:
            torch.testing.assert_close(cpu(got.cache[site]), want.cache[site], **TOL, msg=lambda m, s=site: f"{s}: {m}")


def test_padded_batch_and_last_logits(pair):
    ref, dev = pair
    want = ref.run(PROMPTS, logits="last")
    got = dev.run(PROMPTS, logits="last")
    torch.testing.assert_close(cpu(got.logits), want.logits, **TOL)


def test_gradients(pair):
    ref, dev = pair
    sites = ["embed", "resid_pre.1", "z.1", "head_out.2", "resid_post.2"]
    want = ref.gradients(PROMPTS, logit_diff, sites, logits="last")
    got = dev.gradients(PROMPTS, logit_diff, sites, logits="last")
    for site in sites:
        torch.testing.assert_close(cpu(got.grads[site]), want.grads[site], **TOL, msg=lambda m, s=site: f"{s}: {m}")


def test_generate(pair):
    ref, dev = pair
    assert dev.generate(CLEAN[0], 5) == ref.generate(CLEAN[0], 5)


def test_training_steps():
    ref, dev = load_model("tiny-llama"), load_model("tiny-llama", device=DEVICE)
    adam = AdamConfig(lr=1e-3, eps=1e-4)
    with ref.trainer(adam) as local, dev.trainer(adam) as remote:
        for _ in range(2):  # the second step uses the Adam state
            torch.testing.assert_close(cpu(remote.step(PROMPTS, next_token_loss)), local.step(PROMPTS, next_token_loss), **TOL)
    want, got = ref.get_parameters(), dev.get_parameters()
    for name, value in want.items():
        torch.testing.assert_close(cpu(got[name]), value, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_patching_sweeps():
    from interplab.analyses.patching import Sweep, activation_patching
    from interplab.analyses.tasks import PairSet, ioi_pairs

    ref, dev = load_model("tiny-llama"), load_model("tiny-llama", device=DEVICE)
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 2, seed=0))
    sweeps = [Sweep("resid_pre"), Sweep("z")]
    want = activation_patching(ref, pairs, sweeps, method="both")
    got = activation_patching(dev, pairs, sweeps, method="both")
    for sweep in ("resid_pre", "z"):
        for method in ("exact", "atp"):
            torch.testing.assert_close(got.values(sweep, method), want.values(sweep, method), **TOL)


def test_circuit_edge_scores():
    from interplab.analyses.circuits.scores import score_edges
    from interplab.analyses.circuits.task import prepare
    from interplab.analyses.tasks import PairSet, ioi_pairs

    ref, dev = load_model("tiny-llama"), load_model("tiny-llama", device=DEVICE)
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 4, seed=0, template=0))
    want_task, got_task = prepare(ref, pairs), prepare(dev, pairs)
    for method in ("eap", "eap-ig-inputs"):
        torch.testing.assert_close(cpu(score_edges(got_task, method, ig_steps=3)), score_edges(want_task, method, ig_steps=3), **TOL)


def test_capture_into_a_store(tmp_path):
    from interplab.store import open_store

    ref, dev = load_model("tiny-llama"), load_model("tiny-llama", device=DEVICE)
    store = open_store(str(tmp_path / "store"))
    writer = store.begin_run("capture", model=dev.name)
    sites = ["resid_pre.0", "z.2", "resid_post.2"]
    prompts = PROMPTS + CORRUPT
    assert dev.capture(prompts, sites, writer, batch_size=2, dtype="float32") == 3
    writer.commit()
    want = ref.run(prompts, capture=sites)
    for site in ("resid_pre.0", "resid_post.2"):
        got, index = store.export(writer.run_id, site, with_index=True)
        expected = want.cache[site][torch.as_tensor(index["prompt_id"]), torch.as_tensor(index["position"])]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_close_to_float32(dtype):
    ref = load_model("tiny-llama")
    dev = load_model("tiny-llama", dtype=dtype, device=DEVICE)
    want = ref.run(PROMPTS, capture=["resid_post.2"], logits="last")
    got = dev.run(PROMPTS, capture=["resid_post.2"], logits="last")
    for a, b in ((got.logits, want.logits), (got.cache["resid_post.2"], want.cache["resid_post.2"])):
        a = cpu(a).float()
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= 0.05 * float(b.abs().max()) + 0.05


def _to(intervention: Intervention, device: str) -> Intervention:
    """``intervention`` with its tensor value on ``device``."""
    import dataclasses

    if not isinstance(intervention.value, torch.Tensor):
        return intervention
    return dataclasses.replace(intervention, value=intervention.value.to(device))
