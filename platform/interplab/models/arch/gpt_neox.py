"""GPT-NeoX family: Pythia, GPT-NeoX-20B (partial rotary, fused qkv, usually parallel residual)."""

from __future__ import annotations

from interplab.models.arch.base import ArchSpec, QKVLayout, register_arch


def tiny_config(vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


SPEC = register_arch(
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        tiny_config=tiny_config,
        base="gpt_neox",
        embed="embed_in",
        layers="layers",
        final_norm="final_layer_norm",
        rotary="rotary_emb",
        lm_head="lm_head",
        attn="attention",
        attn_out="attention",
        o_proj="attention.dense",
        mlp_out="mlp",
        mlp_down="mlp.dense_4h_to_h",
        qkv=QKVLayout(
            "input_layernorm",
            "attention.query_key_value",
            "attention.query_key_value",
            "attention.query_key_value",
            fused="heads",
        ),
        ln_mlp="post_attention_layernorm",
        checkpoint_aliases={"lm_head.weight": "embed_out.weight"},
        parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", False)),
        notes="with use_parallel_residual (Pythia) attention and MLP both read resid_pre: no resid_mid",
    )
)
