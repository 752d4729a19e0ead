"""The layer loop reproduces transformers' own forward pass, on every family."""

import pytest
import torch

from interplab.engine import Intervention
from tests.conftest import PROMPTS, SHORT, real_positions


def test_resid_post_equals_hidden_states(tiny, hf_reference):
    batch = tiny.tokenize(PROMPTS + SHORT)
    with torch.no_grad():
        ref = hf_reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    sites = [f"resid_post.{layer}" for layer in range(tiny.n_layers)] + ["embed", "resid_pre.0"]
    out = tiny.run(batch, capture=sites)
    mask = real_positions(batch)
    torch.testing.assert_close(out.cache["embed"][mask], ref.hidden_states[0][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.cache["resid_pre.0"], out.cache["embed"], rtol=0, atol=0)
    for layer in range(tiny.n_layers - 1):  # the last hidden state of HF is after the final norm
        got = out.cache[f"resid_post.{layer}"][mask]
        torch.testing.assert_close(got, ref.hidden_states[layer + 1][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[mask], ref.logits[mask], rtol=0, atol=1e-5)


def test_last_logits_run_the_last_mlp_on_last_positions_only(tiny, hf_reference):
    """A logits="last" pass gives transformers' logits at each row's last real token, padded rows
    included, while the last layer's MLP reads one position per row; anything that reads that layer
    (a capture, an intervention there) runs it whole."""
    batch = tiny.tokenize(PROMPTS + SHORT)
    with torch.no_grad():
        ref = hf_reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = ref[torch.arange(batch.size), batch.last_positions()]
    last = tiny.n_layers - 1
    mlp = tiny.layer(last).get_submodule(tiny.spec.mlp_down.rpartition(".")[0])
    seen: list[int] = []
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        out = tiny.run(batch, logits="last")
        assert seen == [1]
        torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)
        seen.clear()
        captured = tiny.run(batch, logits="last", capture=[f"resid_post.{last}"])
        assert seen == [batch.seq_len]
        torch.testing.assert_close(captured.logits, want, rtol=0, atol=1e-5)
        # an intervention before the MLP (every position) trims; one from the MLP on does not
        steered = [Intervention(tiny.validate_site(f"resid_pre.{last}"), "add", value=0.5)]
        alone = tiny.run(batch, logits="all", interventions=steered).logits[torch.arange(batch.size), batch.last_positions()]
        seen.clear()
        torch.testing.assert_close(tiny.run(batch, logits="last", interventions=steered).logits, alone, rtol=0, atol=1e-5)
        assert seen == [1]
        at_mlp = [Intervention(tiny.validate_site(f"mlp_out.{last}"), "add", value=0.5)]
        seen.clear()
        tiny.run(batch, logits="last", interventions=at_mlp)
        assert seen == [batch.seq_len]
    finally:
        handle.remove()


def test_residual_stream_decomposes(tiny):
    """resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out (parallel: pre + attn + mlp)."""
    batch = tiny.tokenize(PROMPTS)
    sites = ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"]
    if tiny.has_resid_mid:
        sites.append("resid_mid.1")
    cache = tiny.run(batch, capture=sites).cache
    pre, attn, mlp, post = (cache[s] for s in sites[:4])
    if tiny.has_resid_mid:
        torch.testing.assert_close(cache["resid_mid.1"], pre + attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(post, cache["resid_mid.1"] + mlp, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(post, pre + attn + mlp, rtol=0, atol=1e-5)


def test_padded_batch_equals_single_runs(tiny):
    texts = PROMPTS + SHORT
    batch = tiny.tokenize(texts)
    together = tiny.run(batch, capture=["resid_post.1", "z.2"], positions=[-1], logits="last")
    for i, text in enumerate(texts):
        alone = tiny.run(text, capture=["resid_post.1", "z.2"], positions=[-1], logits="last")
        torch.testing.assert_close(together.logits[i], alone.logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together.cache["z.2"][i], alone.cache["z.2"][0], rtol=0, atol=1e-5)


def test_positions_select_per_row(tiny):
    batch = tiny.tokenize(PROMPTS + SHORT)
    full = tiny.run(batch, capture=["mlp_post.0", "pattern.1"]).cache
    last = tiny.run(batch, capture=["mlp_post.0", "pattern.1"], positions=[0, -1]).cache
    for i, length in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(last["mlp_post.0"][i, 1], full["mlp_post.0"][i, length - 1])
        torch.testing.assert_close(last["pattern.1"][i, :, 1], full["pattern.1"][i, :, length - 1])
    assert last.positions.tolist()[0] == [0, batch.lengths[0].item() - 1]


def test_capture_only_pass_stops_early_and_matches(tiny):
    batch = tiny.tokenize(PROMPTS)
    early = tiny.run(batch, capture=["resid_post.0"], logits="none")
    full = tiny.run(batch, capture=["resid_post.0"])
    assert early.logits is None
    torch.testing.assert_close(early.cache["resid_post.0"], full.cache["resid_post.0"], rtol=0, atol=0)


def test_capture_stream_chunks_match_a_single_run(tiny):
    texts = PROMPTS + SHORT + PROMPTS
    chunks = list(tiny.capture_stream(texts, ["resid_pre.1", "q.0"], batch_size=2, positions=[-1]))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert sum((c.prompt_ids for c in chunks), []) == list(range(len(texts)))
    for chunk in chunks:
        for row, prompt_id in enumerate(chunk.prompt_ids):
            alone = tiny.run(texts[prompt_id], capture=["resid_pre.1", "q.0"], positions=[-1]).cache
            torch.testing.assert_close(chunk.acts[tiny.validate_site("resid_pre.1")][row], alone["resid_pre.1"][0], atol=1e-5, rtol=0)
            assert chunk.acts[tiny.validate_site("q.0")].shape[1:] == (1, tiny.n_heads, tiny.head_dim)
            assert len(chunk.tokens[row]) == chunk.lengths[row]


def test_no_hooks_left_behind(tiny):
    tiny.run(PROMPTS, capture=["attn_out.0", "mlp_out.1", "mlp_post.2", "head_out.1", "resid_mid.0" if tiny.has_resid_mid else "z.0"])
    for module in tiny.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_cached_prefix_reproduces_the_full_pass(tiny):
    """Reusing the keys/values of positions < p and computing only p.. gives the same numbers."""
    from interplab.engine.plan import KVPrefix

    batch = tiny.tokenize(PROMPTS)
    full = tiny.run(batch, capture=["resid_pre.1", "resid_post.2", "z.1"], keep_kv=True)
    for p in (1, 5, batch.seq_len - 1):
        prefix = KVPrefix(p, {layer: (k[:, :, :p], v[:, :, :p]) for layer, (k, v) in full.kv.items()})
        hidden = full.cache["resid_pre.1"][:, p:]
        logits, cache = tiny.run_stage(batch, start=1, stop=tiny.n_layers, hidden=hidden, with_head=True,
                                       capture=["resid_post.2", "z.1"], prefix=prefix)
        torch.testing.assert_close(logits, full.logits[:, p:], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache["resid_post.2"], full.cache["resid_post.2"][:, p:], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache["z.1"], full.cache["z.1"][:, p:], rtol=0, atol=1e-5)
        last, _ = tiny.run_stage(batch, start=1, stop=tiny.n_layers, hidden=hidden, with_head=True, prefix=prefix, logits="last")
        torch.testing.assert_close(last, full.logits[:, -1], rtol=0, atol=1e-5)


def test_rows_joining_at_later_layers_equal_their_own_passes(tiny):
    """run_stage(joins=...): rows entering at layer l (their resid_pre given) compute exactly what a
    pass started at l computes for them alone, with padding, interventions and a cached prefix."""
    from interplab.engine.interventions import Intervention
    from interplab.engine.plan import KVPrefix

    texts = PROMPTS + SHORT
    batch = tiny.tokenize(texts)
    n_layers = tiny.n_layers
    pre = [f"resid_pre.{layer}" for layer in range(n_layers)]
    full = tiny.run(batch, capture=pre)
    # batch rows: prompts 0 and 2 run from layer 0, prompt 3 joins at layer 1, prompts 1 and 0 at the last layer
    order = torch.tensor([0, 2, 3, 1, 0])
    bumped = full.cache["resid_pre.1"][[3]] + 0.25
    joins = {1: bumped, n_layers - 1: full.cache[f"resid_pre.{n_layers - 1}"][[1, 0]]}
    steer = Intervention(tiny.validate_site(f"mlp_out.{n_layers - 1}"), "add", value=1.5, rows=torch.tensor([4]))
    logits, _ = tiny.run_stage(batch.select(order), start=0, stop=n_layers, hidden=full.cache["resid_pre.0"][[0, 2]],
                               joins=joins, with_head=True, interventions=[steer])
    sel = real_positions(batch)
    for row, prompt in enumerate([0, 2]):
        torch.testing.assert_close(logits[row][sel[prompt]], full.logits[prompt][sel[prompt]], rtol=0, atol=1e-5)
    alone, _ = tiny.run_stage(batch.select(torch.tensor([3])), start=1, stop=n_layers, hidden=bumped, with_head=True)
    torch.testing.assert_close(logits[2][sel[3]], alone[0][sel[3]], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[3][sel[1]], full.logits[1][sel[1]], rtol=0, atol=1e-5)
    steered = tiny.run(batch.select(torch.tensor([0])), interventions=[
        Intervention(tiny.validate_site(f"mlp_out.{n_layers - 1}"), "add", value=1.5)]).logits
    torch.testing.assert_close(logits[4], steered[0], rtol=0, atol=1e-5)
    assert not torch.allclose(logits[4], full.logits[0])  # the steer reached only its row

    same = tiny.tokenize(PROMPTS)  # equal lengths: a cached prefix of p positions
    ref = tiny.run(same, capture=pre, keep_kv=True)
    p = 3
    prefix = KVPrefix(p, {layer: (k[[1, 0]][:, :, :p], v[[1, 0]][:, :, :p]) for layer, (k, v) in ref.kv.items()})
    logits, _ = tiny.run_stage(same.select(torch.tensor([1, 0])), start=0, stop=n_layers, with_head=True, prefix=prefix,
                               logits="last", joins={0: ref.cache["resid_pre.0"][[1], p:], 1: ref.cache["resid_pre.1"][[0], p:]})
    # attention over a cached prefix sums in another order than the full pass: float32 rounding
    # reaches 1.0e-5 on logits of magnitude ~1 (gemma2's soft cap); a wrong prefix is off by ~1e-1
    torch.testing.assert_close(logits, ref.logits[[1, 0], -1], rtol=0, atol=3e-5)
    # the same prefix held once per prompt, each row naming its prompt's (rows): the same pass
    shared = KVPrefix(p, {layer: (k[:, :, :p], v[:, :, :p]) for layer, (k, v) in ref.kv.items()}, rows=torch.tensor([1, 0]))
    again, _ = tiny.run_stage(same.select(torch.tensor([1, 0])), start=0, stop=n_layers, with_head=True, prefix=shared,
                              logits="last", joins={0: ref.cache["resid_pre.0"][[1], p:], 1: ref.cache["resid_pre.1"][[0], p:]})
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_joins_reject_what_they_cannot_do(tiny):
    batch = tiny.tokenize(PROMPTS)
    hidden = tiny.run(batch, capture=["resid_pre.1"]).cache["resid_pre.1"]
    with pytest.raises(ValueError, match="holds? 1 rows, the batch has 2"):
        tiny.run_stage(batch, start=1, stop=tiny.n_layers, joins={1: hidden[:1]})
    with pytest.raises(ValueError, match=r"outside the stage's layers \[1, 2\)"):
        tiny.run_stage(batch, start=1, stop=2, hidden=hidden[:1], joins={2: hidden[1:]})
    with pytest.raises(ValueError, match="cannot be combined with capture"):
        tiny.run_stage(batch, start=1, stop=tiny.n_layers, hidden=hidden[:1], joins={1: hidden[1:]}, capture=["resid_post.1"])
    with pytest.raises(ValueError, match="no rows at layer 0"):
        tiny.run_stage(batch, start=0, stop=tiny.n_layers, joins={1: hidden})


def test_vocab_subset_equals_the_full_logits_columns(tiny):
    batch = tiny.tokenize(PROMPTS)
    full = tiny.run(batch, logits="last").logits
    vocab = torch.tensor([7, 3, tiny.d_vocab - 1, 3])  # any order, repeats allowed
    for start in (0, 1):
        hidden = None if start == 0 else tiny.run(batch, capture=[f"resid_pre.{start}"]).cache[f"resid_pre.{start}"]
        sub, _ = tiny.run_stage(batch, start=start, stop=tiny.n_layers, hidden=hidden, with_head=True,
                                logits="last", vocab=vocab)
        assert sub.shape == (len(PROMPTS), 4)
        torch.testing.assert_close(sub, full[:, vocab], rtol=1e-5, atol=1e-5)
    # captured logits keep the whole vocabulary in the cache; the returned columns are still the subset
    sub, cache = tiny.run_stage(batch, start=0, stop=tiny.n_layers, with_head=True, logits="last", vocab=vocab,
                                capture=["logits"])
    torch.testing.assert_close(sub, full[:, vocab], rtol=1e-5, atol=1e-5)
    assert cache["logits"].shape[-1] == tiny.d_vocab


def test_vocab_subset_rejects_bad_ids(tiny):
    batch = tiny.tokenize(PROMPTS)
    with pytest.raises(ValueError, match=rf"outside \[0, {tiny.d_vocab}\)"):
        tiny.run_stage(batch, start=0, stop=tiny.n_layers, with_head=True, vocab=torch.tensor([0, tiny.d_vocab]))
    with pytest.raises(ValueError, match="needs with_head=True"):
        tiny.run_stage(batch, start=0, stop=1, vocab=torch.tensor([0]))
    with pytest.raises(ValueError, match="non-empty 1-d tensor of token ids"):
        tiny.run_stage(batch, start=0, stop=tiny.n_layers, with_head=True, vocab=torch.tensor([0.5]))
