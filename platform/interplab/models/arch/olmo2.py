"""OLMo 2 family (post-norm blocks: norms after attention and MLP, q/k RMSNorm)."""

from __future__ import annotations

from interplab.models.arch.base import ArchSpec, register_arch


def tiny_config(vocab_size: int):
    from transformers import Olmo2Config

    return Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


SPEC = register_arch(
    ArchSpec(
        name="olmo2",
        model_types=("olmo2",),
        tiny_config=tiny_config,
        base="model",
        embed="embed_tokens",
        layers="layers",
        final_norm="norm",
        rotary="rotary_emb",
        lm_head="lm_head",
        attn="self_attn",
        attn_out="post_attention_layernorm",
        o_proj="self_attn.o_proj",
        mlp_out="post_feedforward_layernorm",
        mlp_down="mlp.down_proj",
        notes="attn_out/mlp_out are after the post-attention/post-feedforward norms (what the residual adds)",
    )
)
