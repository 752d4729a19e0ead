"""Captures copied into reused CPU buffers: same values, never overwritten while the user holds them."""

from __future__ import annotations

import torch

from interplab import load_model
from interplab.engine.arena import CaptureArena

PROMPTS = ["the cat sat on the mat", "a dog ran"]
SITES = ["resid_pre.0", "resid_post.1", "mlp_out.1", "attn_out.0"]


def test_captures_are_reused_only_when_released():
    model = load_model("tiny-llama")
    first = model.run(PROMPTS, capture=SITES)  # sizes the arena; plain tensors
    kept = {s: first.cache[s].clone() for s in SITES}
    second = model.run(PROMPTS, capture=SITES)  # into a buffer
    view = second.cache["resid_post.1"][0]  # a view the user derived keeps the buffer busy
    del second
    other = model.run(["completely different words here"], capture=SITES)  # takes the second buffer
    assert other.cache["resid_pre.0"].shape[0] == 1
    del other
    third = model.run(PROMPTS, capture=SITES)
    assert torch.equal(view, kept["resid_post.1"][0])
    for site in SITES:
        assert torch.equal(first.cache[site], kept[site])
        assert torch.equal(third.cache[site], kept[site])
    storages = {third.cache[s].untyped_storage().data_ptr() for s in SITES}
    assert len(storages) == 1, "captures of one call share one arena buffer"
    del third, view
    fourth = model.run(PROMPTS, capture=SITES)
    assert fourth.cache["resid_pre.0"].untyped_storage().data_ptr() in {b.untyped_storage().data_ptr() for b in model._arena._buffers}


def test_arena_lease_falls_through_when_busy_or_unsized():
    arena = CaptureArena(keep=1)
    like = torch.ones(4, 3)
    lease = arena.lease(torch.float32, "cpu")
    assert lease.take(like) is None  # first call: size unknown
    arena.done(lease, torch.float32)
    lease = arena.lease(torch.float32, "cpu")
    held = lease.take(like)
    assert held is not None and held.shape == (4, 3)
    assert arena.lease(torch.float32, "cpu").buffer is None  # busy, and the pool is full
    del held, lease
    assert arena.lease(torch.float32, "cpu").buffer is not None
    assert arena.lease(torch.float32, "meta").buffer is None  # only CPU is pooled
