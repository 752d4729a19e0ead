"""Built-in tiny random-weight models for tests: ``tiny-gpt2``, ``tiny-llama``, ...

Each is a few layers with d_model 64, initialised deterministically from a seed without touching the
global RNG, and paired with a small word-level tokenizer (byte-level pre-tokenisation, so ``" Mary"``
is one token, as with GPT-2-style tokenizers) whose vocabulary ships in ``interplab/data``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

TINY_PREFIX = "tiny-"
UNK, EOS = "<unk>", "<|endoftext|>"


@lru_cache(maxsize=1)
def word_level_tokenizer():
    """The ``tokenizers`` backend of the tiny tokenizer: the shipped vocabulary, byte-level
    pre-tokenisation, no post-processor (no special tokens added); built without transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = resources.files("interplab.data").joinpath("tiny_vocab.txt").read_text().split("\n")
    vocab = {UNK: 0, EOS: 1}
    for word in words:
        if word and word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def tiny_tokenizer():
    """A deterministic word-level tokenizer (unknown words map to ``<unk>``)."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    tok = word_level_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def tiny_families() -> list[str]:
    from interplab.models.arch import registered_archs

    return sorted(registered_archs())


def build_tiny(family: str, *, seed: int = 0, dtype=None):
    """A random-weight model of ``family`` and its tokenizer, identical for identical seeds."""
    import torch
    from transformers import AutoModelForCausalLM

    from interplab.models.arch import get_arch

    spec = get_arch(family)
    tokenizer = tiny_tokenizer()
    config = spec.tiny_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        _spread_weights(model, seed)
    return model, tokenizer


def _spread_weights(model, seed: int) -> None:
    """Re-draw every parameter with a unit-scale spread so tiny models have non-trivial attention.

    Default initialisers (std 0.02) give near-uniform attention and near-constant outputs on a
    64-dim model, which would let wrong interventions pass tests by accident.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[-1] if param.ndim > 1 else 1
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
