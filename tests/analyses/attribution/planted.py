"""A one-layer Llama whose target log-prob depends on exactly the *key* tokens of its prompt.

The tokenizer is the tiny word-level one with a BOS token (``<|endoftext|>``) added in front of
every prompt, as Llama 3's is. Embeddings: a constant carrier (dim 0, size 10) on every token, dim 1
on key tokens, dim 2 on BOS. Head 0 of the one attention layer queries with a constant (its bias) and
keys on dims 1 and 2 in the slowest rotary pair (RoPE base 1e30, so positions do not matter): BOS
scores 20 + ln(1000), each key token 20, every other token 0 (weight e^-20 relative). Its value
is 1 on key tokens, so with c key tokens present the head writes ``100 c / (1000 + c)`` (linear in
c to 1 %) into dim 3. Head 1 attends to BOS alone and writes 1000 into dim 4: the final norm's scale
then comes from BOS, not from the last token's own embedding (which a zero mask would remove). The
unembedding reads dim 3 for the target token only, with an offset (from dim 4) that keeps the
target's logit below -4, where its log-prob is linear in its logit. Removing one key token lowers
log p(target) by about 1 nat; removing any other token changes it by less than 1e-3 nats.
"""

from __future__ import annotations

import math
import random

import torch

from interplab.models.tiny import EOS, UNK, tiny_tokenizer

HEAD_DIM = 8
SLOW = 3  # the head dimension in RoPE's slowest pair (3, 7)
SINK_WEIGHT = 1000.0


def bos_tokenizer():
    """The tiny tokenizer with a BOS token added in front of every prompt."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def words(tokenizer) -> list[str]:
    """Words that are one token at the start of a prompt and after a space."""
    vocab = tokenizer.get_vocab()
    return sorted(w for w in vocab if w.isalpha() and "Ġ" + w in vocab)


def planted_model(key_words: list[str], target: str = " Paris", max_keys: int = 16):
    """The model (a HookedModel) and its tokenizer; ``key_words`` are the key tokens (both forms)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from interplab.engine.hooked import HookedModel

    tok = bos_tokenizer()
    vocab = tok.get_vocab()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_theta=1e30,
        rms_norm_eps=1e-6,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=1,
    )
    hf = LlamaForCausalLM(config).eval()
    keys = sorted({vocab[w] for w in key_words} | {vocab["Ġ" + w] for w in key_words})
    target_id = tok(target, add_special_tokens=False)["input_ids"]
    if len(target_id) != 1 or target_id[0] in keys:
        raise ValueError(f"target {target!r} must be one token and not a key")
    carrier = 10.0
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for norm in (hf.model.norm, hf.model.layers[0].input_layernorm, hf.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        emb = hf.model.embed_tokens.weight
        emb[:, 0] = carrier
        emb[keys, 1] = 1.0
        emb[1, 2] = 1.0  # BOS
        normed = 4.0 / math.sqrt(1.0 + 1.0 / carrier**2) / carrier  # dim 1 (or 2) of a normalised key (or BOS) row
        attn = hf.model.layers[0].self_attn
        attn.q_proj.bias[SLOW] = math.sqrt(HEAD_DIM)  # cancels the 1/sqrt(head_dim) scaling
        attn.k_proj.weight[SLOW, 1] = 20.0 / normed
        attn.k_proj.weight[SLOW, 2] = (20.0 + math.log(SINK_WEIGHT)) / normed
        attn.v_proj.weight[0, 1] = 1.0 / normed
        attn.o_proj.weight[3, 0] = 100.0
        # head 1: BOS only, writing the final norm's scale into dim 4
        attn.q_proj.bias[HEAD_DIM + SLOW] = math.sqrt(HEAD_DIM)
        attn.k_proj.weight[HEAD_DIM + SLOW, 2] = 40.0 / normed
        attn.v_proj.weight[HEAD_DIM, 2] = 1.0 / normed
        attn.o_proj.weight[4, HEAD_DIM] = 1000.0
        # the final norm maps the residual [10, 0, 0, a, 1000] to ~[0.04, 0, 0, a / 250, 4]; per key, a grows by ~0.1
        lm = hf.lm_head.weight
        lm[target_id[0], 3] = 2500.0  # ~1 nat per key token
        lm[target_id[0], 4] = -(max_keys + 4) / 4.0  # the offset: logit <= -4 with up to max_keys keys
    return HookedModel(hf, tok, name="planted-llama"), tok


def planted_prompt(tokenizer, n: int, spans: list[tuple[int, int]], seed: int = 0) -> tuple[str, list[str], set[int]]:
    """A prompt of ``n`` word tokens whose units (positions minus the BOS) in ``spans`` ([a, b)) are
    key words: the text, the key words used, and the planted unit indexes."""
    rng = random.Random(seed)
    pool = words(tokenizer)
    rng.shuffle(pool)
    planted = {u for a, b in spans for u in range(a, b)}
    key_words, fillers = pool[: len(planted)], pool[len(planted) : len(planted) + 200]
    keys = iter(key_words)
    text = [next(keys) if u in planted else rng.choice(fillers) for u in range(n)]
    prompt = " ".join(text)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) != n + 1:  # every word is one token, plus the BOS
        raise ValueError(f"planted prompt tokenizes to {len(ids)} tokens, expected {n + 1}")
    return prompt, key_words, planted
