"""Tiny GPT-2 models whose circuit is known by construction (hand-set weights)."""

from __future__ import annotations

import torch

from interplab import load_model


def planted_gpt2(seed: int = 0):
    """A 3-layer model in which only two heads and their edges carry the answer.

    Token embeddings live in dims 0..31 (no position embedding, no MLPs). Head ``a0.h1`` attends
    uniformly (zero queries and keys), reads the tokens through its value and writes them into dims
    32..63. Head ``a2.h3`` queries with the current token (dims 0..31), keys and values on what
    ``a0.h1`` wrote (dims 32..63), and writes into the token dims, which the tied unembedding reads.
    Every other head and MLP has zero weights; the MLPs are zero. Returns the model and the planted edges (names).
    """
    model = load_model("tiny-gpt2")
    hf = model.model
    gen = torch.Generator().manual_seed(seed)
    d = hf.config.n_embd
    hd = d // hf.config.n_head
    half = d // 2

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        tr = hf.transformer
        # zero-mean token vectors of equal norm: the layer norms see (nearly) the same scale everywhere
        tokens = rand(tr.wte.weight.shape[0], half)
        tokens = tokens - tokens.mean(1, keepdim=True)
        tr.wte.weight[:, :half] = tokens / tokens.norm(dim=1, keepdim=True) * half**0.5
        for module in [tr.ln_f] + [n for block in tr.h for n in (block.ln_1, block.ln_2)]:
            module.weight.fill_(1.0)
        mover, reader = tr.h[0].attn, tr.h[2].attn
        h = 1  # a0.h1: value reads tokens, writes to dims half..d
        mover.c_attn.weight[:half, 2 * d + h * hd : 2 * d + (h + 1) * hd] = rand(half, hd, scale=0.5)
        mover.c_proj.weight[h * hd : (h + 1) * hd, half:] = rand(hd, half, scale=0.05)  # small: no effect on norms
        h = 3  # a2.h3
        reader.c_attn.weight[:half, h * hd : (h + 1) * hd] = rand(half, hd, scale=1.0)  # q from tokens
        reader.c_attn.weight[half:, d + h * hd : d + (h + 1) * hd] = rand(half, hd, scale=20.0)  # k from a0.h1
        reader.c_attn.weight[half:, 2 * d + h * hd : 2 * d + (h + 1) * hd] = rand(half, hd, scale=20.0)  # v from a0.h1
        reader.c_proj.weight[h * hd : (h + 1) * hd, :half] = rand(hd, half, scale=2.0)
    # input->a2.h3<q> is wired too, but clean and corrupted prompts share the last (query) token, so
    # that edge carries no difference: it is not part of the circuit for this task
    planted = {"input->a0.h1<v>", "a0.h1->a2.h3<k>", "a0.h1->a2.h3<v>", "a2.h3->logits"}
    return model, planted
