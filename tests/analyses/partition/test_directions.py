"""Stored directions in later specs: exemplar ablation and steering through the engine equal a hand-written
projection hook on the Hugging Face model; probe references resolve; bad references say why."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from interplab.analyses.directions import (
    DirectionError,
    DirectionIntervention,
    DirectionRef,
    direction_intervention,
    resolve_direction,
)
from interplab.analyses.partition import DictionaryError, exemplar_direction
from tests.analyses.partition.conftest import SITE
from tests.conftest import SHORT as PROMPTS  # no row equals an exemplar: see test_exemplar_ablation...

LAYER = int(SITE.split(".")[1])


@pytest.fixture(scope="module")
def hf_llama():
    """The same tiny llama run by transformers, in float64: ablating a row's own exemplar leaves that
    row's residual at rounding level, which the next RMSNorm blows up in float32."""
    from interplab.models.tiny import build_tiny

    model, _ = build_tiny("llama")
    model.set_attn_implementation("eager")
    return model.double().eval()


@pytest.fixture(scope="module")
def llama64():
    from interplab import load_model

    return load_model("tiny-llama", dtype="float64")


def hf_logits(hf, input_ids: torch.Tensor, edit) -> torch.Tensor:
    """HF forward with ``edit(hidden)`` applied to decoder layer LAYER's output (= resid_post.LAYER)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = edit(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = hf.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(input_ids=input_ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("region", [0, 3])
def test_exemplar_ablation_equals_a_manual_projection(partitioned, hf_llama, llama64, region):
    """On prompts other than the dictionary's own: ablating a row's own exemplar leaves its residual at
    rounding level, where the next RMSNorm magnifies the engine's ~1e-6 difference from transformers."""
    store, _, run_id, _ = partitioned
    model = llama64
    u = torch.from_numpy(exemplar_direction(store, run_id, region)).double()
    entry = {"direction": {"run_id": run_id, "region": region}, "op": "ablate"}
    intervention = direction_intervention(store, entry)
    assert str(intervention.site) == SITE  # the direction's own site by default
    for prompt in PROMPTS:
        batch = model.tokenize([prompt])
        with torch.no_grad():
            ablated = model.run([prompt], interventions=[intervention]).logits
            clean = model.run([prompt]).logits
        reference = hf_logits(hf_llama, batch.input_ids, lambda h: h - (h @ u)[..., None] * u)
        torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)  # the engine and transformers agree to ~1e-6 unpatched
        assert (ablated - clean).abs().max() > 1e-3  # the ablation changed the output


def test_exemplar_steering_at_the_last_position_equals_a_manual_hook(partitioned, hf_llama, llama64):
    store, _, run_id, _ = partitioned
    model = llama64
    u = torch.from_numpy(exemplar_direction(store, run_id, 1)).double()
    entry = DirectionIntervention(direction=DirectionRef(run_id=run_id, region=1), op="steer", coeff=3.0, positions=[-1])
    prompt = PROMPTS[0]
    batch = model.tokenize([prompt])
    with torch.no_grad():
        steered = model.run([prompt], interventions=[direction_intervention(store, entry)]).logits

    def add_last(h):
        h = h.clone()
        h[:, -1] += 3.0 * u
        return h

    torch.testing.assert_close(steered, hf_logits(hf_llama, batch.input_ids, add_last), atol=1e-5, rtol=1e-5)  # the engine and transformers agree to ~1e-6 unpatched


def test_probe_references_read_the_probe_runs_weights(partitioned):
    store, _, _, _ = partitioned
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    with store.begin_run("probe", model="tiny-llama") as writer:
        table = pa.table(  # the probe kind's probe_weights layout: one row per (site, layer, class)
            {
                "site": ["resid_post"] * 6,
                "layer": pa.array([1, 2, 2, 3, 3, 3], pa.int32()),
                "class": ["io", "s", "io", "a", "b", "c"],
                "class_index": pa.array([0, 1, 0, 0, 1, 2], pa.int32()),
                "weight": [list(map(float, v)) for v in w],
                "bias": [0.1] * 6,
            }
        )
        writer.write_table("probe_weights", table, chunk="probes")
    probe_run = writer.run_id

    def unit(v):
        return v / np.linalg.norm(v)

    got = resolve_direction(store, {"run_id": probe_run, "probe": "resid_post.1"})
    np.testing.assert_allclose(got.vector, unit(w[0]), rtol=1e-6)
    assert (got.site, got.kind) == ("resid_post.1", "probe")
    binary = resolve_direction(store, {"run_id": probe_run, "probe": "resid_post.2"})  # class 1 - class 0
    np.testing.assert_allclose(binary.vector, unit(w[1] - w[2]), rtol=1e-5)
    by_label = resolve_direction(store, {"run_id": probe_run, "probe": "resid_post.3", "label": "b"})
    np.testing.assert_allclose(by_label.vector, unit(w[4]), rtol=1e-6)
    with pytest.raises(DirectionError, match="pick one with 'label'"):
        resolve_direction(store, {"run_id": probe_run, "probe": "resid_post.3"})
    with pytest.raises(DirectionError, match="no probe at 'resid_post.5'"):
        resolve_direction(store, {"run_id": probe_run, "probe": "resid_post.5"})
    with pytest.raises(DirectionError, match="'probe' refers to a probe run"):
        resolve_direction(store, {"run_id": partitioned[2], "probe": "resid_post.1"})


def test_bad_references(partitioned):
    from interplab.analyses.partition.job import capture_run_id

    store, _, run_id, _ = partitioned
    with pytest.raises(DirectionError, match="'region' refers to a partition run"):
        resolve_direction(store, {"run_id": capture_run_id(run_id), "region": 0})
    with pytest.raises(DictionaryError, match="out of range"):
        resolve_direction(store, {"run_id": run_id, "region": 10_000})
    with pytest.raises(ValueError, match="exactly one of 'region'"):
        DirectionRef(run_id=run_id)
    with pytest.raises(ValueError, match="exactly one of 'region'"):
        DirectionRef(run_id=run_id, region=1, probe="resid_post.1")
    with pytest.raises(ValueError, match="'op'|op"):
        DirectionIntervention.model_validate({"direction": {"run_id": run_id, "region": 0}, "op": "erase"})
