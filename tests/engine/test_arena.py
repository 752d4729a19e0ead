"""Captures copied into reused CPU buffers: same values, never overwritten while the user holds them."""

from __future__ import annotations

import torch

from interplab import load_model
from interplab.engine import steer
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


def test_a_tensor_captured_at_two_sites_is_copied_once_unless_changed_between():
    model = load_model("tiny-llama")
    sites = ["resid_post.0", "resid_pre.1"]
    model.run(PROMPTS, capture=sites)  # sizes the arena
    out = model.run(PROMPTS, capture=sites)
    post, pre = out.cache["resid_post.0"], out.cache["resid_pre.1"]
    assert torch.equal(post, pre)
    assert pre.data_ptr() == post.data_ptr(), "resid_post[0] is resid_pre[1]: one copy"
    reference = model.run(PROMPTS, capture=["resid_post.0"]).cache["resid_post.0"].clone()
    assert torch.equal(post, reference)
    # an intervention at resid_pre[1] makes them differ: the capture must follow it
    shift = torch.ones(model.d_model)
    steered = model.run(PROMPTS, capture=sites, interventions=[steer("resid_pre.1", shift)])
    assert torch.equal(steered.cache["resid_post.0"], reference)
    torch.testing.assert_close(steered.cache["resid_pre.1"], reference + shift)


def test_resid_mid_added_into_the_arena_equals_resid_pre_plus_attn_out():
    model = load_model("tiny-llama")
    sites = ["resid_pre.1", "attn_out.1", "resid_mid.1"]
    first = model.run(PROMPTS, capture=sites)
    expected = first.cache["resid_pre.1"] + first.cache["attn_out.1"]
    del first
    second = model.run(PROMPTS, capture=sites)  # now in an arena buffer
    buffers = {b.untyped_storage().data_ptr() for b in model._arena._buffers}
    assert second.cache["resid_mid.1"].untyped_storage().data_ptr() in buffers
    torch.testing.assert_close(second.cache["resid_mid.1"], expected, rtol=0, atol=0)


def _buffer_ptrs(model) -> set[int]:
    return {b.untyped_storage().data_ptr() for b in model._arena._buffers}


def test_full_logits_are_written_into_the_arena_bit_identical_and_never_over_held_ones():
    model = load_model("tiny-llama")
    head = model.model.get_submodule(model.spec.lm_head)
    first = model.run(PROMPTS)  # sizes the arena; plain tensors
    hidden = model.run(PROMPTS, capture=["final"]).cache["final"]
    reference = torch.nn.functional.linear(hidden, head.weight, head.bias)  # what nn.Linear computes
    assert torch.equal(first.logits, reference)
    held = model.run(PROMPTS).logits  # into a buffer
    assert held.untyped_storage().data_ptr() in _buffer_ptrs(model)
    assert torch.equal(held, reference)
    other = model.run(["completely different words here"]).logits  # the held buffer is busy
    assert other.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    again = model.run(PROMPTS).logits  # both buffers busy: plain memory, the held ones untouched
    assert again.untyped_storage().data_ptr() not in _buffer_ptrs(model)
    assert torch.equal(held, reference) and torch.equal(again, reference)
    # only whole logits on a grad-free pass are pooled
    last = model.run(PROMPTS, logits="last").logits
    assert last.untyped_storage().data_ptr() not in _buffer_ptrs(model)
    trained = model.run(PROMPTS, grad=True).logits
    assert trained.requires_grad and trained.untyped_storage().data_ptr() not in _buffer_ptrs(model)
    torch.testing.assert_close(trained.detach(), reference, rtol=0, atol=0)


def test_logits_with_a_softcap_or_a_logits_intervention_are_not_pooled_and_stay_right():
    model = load_model("tiny-gemma2")  # tanh soft-capped logits
    first = model.run(PROMPTS).logits.clone()
    second = model.run(PROMPTS).logits
    assert second.untyped_storage().data_ptr() not in _buffer_ptrs(model)
    assert torch.equal(first, second)
    llama = load_model("tiny-llama")
    llama.run(PROMPTS)
    shift = torch.ones(llama.d_vocab)
    plain = llama.run(PROMPTS).logits.clone()
    steered = llama.run(PROMPTS, interventions=[steer("logits", shift)]).logits
    torch.testing.assert_close(steered, plain + shift)
