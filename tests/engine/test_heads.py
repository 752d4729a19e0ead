"""Per-head sites against hand computations from the captured q, k, v."""

import torch

from tests.conftest import PROMPTS, SHORT


def _o_proj(tiny, layer):
    return tiny.layer(layer).get_submodule(tiny.spec.o_proj)


def test_pattern_and_z_recomputed_by_hand(tiny):
    batch = tiny.tokenize(PROMPTS + SHORT)
    for layer in range(tiny.n_layers):
        sites = [f"{k}.{layer}" for k in ("q", "k", "v", "pattern", "z")]
        cache = tiny.run(batch, capture=sites).cache
        q, k, v = (cache[f"{name}.{layer}"].transpose(1, 2) for name in "qkv")  # [b, h, s, d]
        attn = tiny.layer(layer).get_submodule(tiny.spec.attn)
        scores = q @ k.transpose(-1, -2) * attn.scaling
        softcap = getattr(tiny.config, "attn_logit_softcapping", None)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        s = batch.seq_len
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        allowed = (j <= i) & batch.attention_mask.bool()[:, None, None, :]
        if tiny.layer_types[layer] == "sliding_attention":
            allowed = allowed & (i - j < tiny.sliding_window)
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        real = batch.attention_mask.bool()  # padded query rows may see no key at all: skip them
        got = cache[f"pattern.{layer}"].transpose(1, 2)[real]
        torch.testing.assert_close(got, pattern.transpose(1, 2)[real], rtol=0, atol=1e-6)
        z = (pattern.nan_to_num() @ v).transpose(1, 2)
        torch.testing.assert_close(cache[f"z.{layer}"][real], z[real], rtol=0, atol=1e-5)


def test_grouped_kv_heads_are_expanded_to_query_heads(tiny):
    cache = tiny.run(PROMPTS, capture=["k.0", "v.0"]).cache
    assert cache["k.0"].shape[2] == tiny.n_heads
    group = tiny.n_heads // tiny.n_kv_heads
    if group > 1:
        torch.testing.assert_close(cache["k.0"][:, :, 0], cache["k.0"][:, :, group - 1], rtol=0, atol=0)
        assert not torch.allclose(cache["k.0"][:, :, 0], cache["k.0"][:, :, group])


def test_head_out_sums_to_attention_output(tiny):
    batch = tiny.tokenize(PROMPTS)
    for layer in range(tiny.n_layers):
        cache = tiny.run(batch, capture=[f"head_out.{layer}", f"attn_out.{layer}", f"head_out.{layer}.1"]).cache
        heads = cache[f"head_out.{layer}"]
        assert heads.shape[2:] == (tiny.n_heads, tiny.d_model)
        torch.testing.assert_close(cache[f"head_out.{layer}.1"][:, :, 0], heads[:, :, 1])
        total = heads.sum(dim=2)
        bias = _o_proj(tiny, layer).bias
        if bias is not None:
            total = total + bias
        if tiny.spec.attn_out != tiny.spec.attn:  # post-norm families: attn_out is norm(o_proj(z))
            total = tiny.layer(layer).get_submodule(tiny.spec.attn_out)(total)
        torch.testing.assert_close(total, cache[f"attn_out.{layer}"], rtol=0, atol=1e-5)


def test_zeroing_a_heads_z_equals_removing_its_head_out(tiny):
    from interplab.engine import zero

    batch = tiny.tokenize(PROMPTS)
    via_z = tiny.run(batch, interventions=[zero("z.1.2")], logits="last").logits
    via_head_out = tiny.run(batch, interventions=[zero("head_out.1.2")], logits="last").logits
    clean = tiny.run(batch, logits="last").logits
    torch.testing.assert_close(via_z, via_head_out, rtol=0, atol=1e-5)
    assert (via_z - clean).abs().max() > 1e-3
