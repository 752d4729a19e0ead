"""Shared fixtures: tiny models of every family, and independent Hugging Face references."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "gemma2", "olmo2"]
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Alice went to the park, Alice gave a ball to",
]
SHORT = ["The city of Paris is in France", "Mary lives in"]


@pytest.fixture(scope="session")
def tiny_models():
    """Family -> HookedModel (float32), built once per session."""
    from interplab import load_model

    cache: dict[str, object] = {}

    def get(family: str, dtype: str = "float32"):
        key = f"{family}:{dtype}"
        if key not in cache:
            cache[key] = load_model(f"tiny-{family}", dtype=dtype)
        return cache[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(tiny_models, family):
    return tiny_models(family)


@pytest.fixture
def hf_reference(family):
    """An independent copy of the same tiny model, run by transformers itself (eager attention)."""
    from interplab.models.tiny import build_tiny

    model, _ = build_tiny(family)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture
def tiny64(family):
    """The tiny model in float64, for finite differences."""
    from interplab import load_model

    return load_model(f"tiny-{family}", dtype="float64")


def real_positions(batch) -> torch.Tensor:
    return batch.attention_mask.bool()


@pytest.fixture(autouse=True)
def _object_stays_clean(request):
    """nnsight mounts ``save`` on ``object`` when imported; in this process that breaks every later
    anyio import (Ray Serve replicas, the dashboard). Peer libraries that do that run in a child process."""
    yield
    assert not hasattr(object, "save"), f"{request.node.nodeid} left a 'save' attribute on object (import nnsight in a child process)"
