"""Qwen2 family (Llama-like with q/k/v biases and optional sliding-window layers)."""

from __future__ import annotations

from interplab.models.arch.base import ArchSpec, QKVLayout, register_arch


def tiny_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


SPEC = register_arch(
    ArchSpec(
        name="qwen2",
        model_types=("qwen2",),
        base="model",
        embed="embed_tokens",
        layers="layers",
        final_norm="norm",
        rotary="rotary_emb",
        lm_head="lm_head",
        attn="self_attn",
        attn_out="self_attn",
        o_proj="self_attn.o_proj",
        mlp_out="mlp",
        mlp_down="mlp.down_proj",
        qkv=QKVLayout("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ln_mlp="post_attention_layernorm",
        tiny_config=tiny_config,
    )
)
