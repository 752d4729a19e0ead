"""GPT-2 family (pre-LayerNorm, learned absolute positions, fused qkv in a Conv1D)."""

from __future__ import annotations

from interplab.models.arch.base import ArchSpec, QKVLayout, register_arch


def _embed(base, input_ids, position_ids):
    hidden = base.wte(input_ids) + base.wpe(position_ids)
    return base.drop(hidden)


def tiny_config(vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


SPEC = register_arch(
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        tiny_config=tiny_config,
        base="transformer",
        embed="wte",
        layers="h",
        final_norm="ln_f",
        lm_head="lm_head",
        attn="attn",
        attn_out="attn",
        o_proj="attn.c_proj",
        o_proj_transposed=True,
        mlp_out="mlp",
        mlp_down="mlp.c_proj",
        embed_fn=_embed,
        qkv=QKVLayout("ln_1", "attn.c_attn", "attn.c_attn", "attn.c_attn", fused="blocks", transposed=True),
        ln_mlp="ln_2",
        notes="embed = wte(token) + wpe(position)",
    )
)
