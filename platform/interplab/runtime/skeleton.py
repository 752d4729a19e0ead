"""The driver's view of a model: config, tokenizer and sites, with every weight on the meta device.

A pipeline's driver validates sites, tokenises prompts and plans splits without holding any weights
(the stages hold them). Built-in tiny test models are small enough to build whole.
"""

from __future__ import annotations


def load_skeleton(name: str, *, dtype: str = "float32", seed: int = 0, trust_remote_code: bool = False):
    """A :class:`~interplab.engine.hooked.HookedModel` whose parameters are on ``meta`` (tiny models: real)."""
    from interplab.engine.hooked import HookedModel
    from interplab.models.loading import load_model, resolve_dtype, resolve_source, weight_hash
    from interplab.models.tiny import TINY_PREFIX

    if name.startswith(TINY_PREFIX):
        return load_model(name, dtype=dtype, seed=seed)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return HookedModel(model.eval(), tokenizer, name=name, weight_hash=weight_hash(source))
