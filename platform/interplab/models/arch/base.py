"""The declarative description of a model family, and the family registry.

An :class:`ArchSpec` tells the engine where things are in a Hugging Face model of that family
(module paths relative to the decoder stack or to one decoder layer) and the few behaviours that
are not plain module calls (how embeddings are formed, logit soft-capping, parallel residuals).
The engine never branches on the family name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class QKVLayout:
    """Where one layer's query/key/value projections are, for the per-head input sites.

    ``q_in``/``k_in``/``v_in`` give every query head its own copy of the residual stream it reads
    (before the attention norm), so each head's q, k and v can be patched or differentiated on its
    own; the engine then applies ``ln`` and that head's rows of the projection itself.

    Attributes:
        ln: the norm the projections read through (path in one decoder layer).
        q, k, v: the projection modules (the same path three times when fused).
        fused: ``None`` (separate projections), ``"blocks"`` (one output ``[q | k | v]``, GPT-2's
            ``c_attn``) or ``"heads"`` (per head ``[q_h k_h v_h]``, GPT-NeoX's ``query_key_value``).
        transposed: the weight is ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    ln: str
    q: str
    k: str
    v: str
    fused: str | None = None
    transposed: bool = False


EmbedFn = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one family's Hugging Face model live.

    Paths are dotted attribute paths. ``base`` is relative to the ``*ForCausalLM`` model; ``embed``,
    ``layers``, ``final_norm``, ``rotary`` are relative to ``base``; ``lm_head`` to the causal-LM
    model; ``attn``, ``attn_out``, ``o_proj``, ``mlp_out``, ``mlp_down`` to one decoder layer.

    Attributes:
        attn_out: the module whose output is added to the residual stream after attention
            (the attention module itself for pre-norm families, the post-attention norm for
            post-norm families such as Gemma 2 and OLMo 2).
        o_proj_transposed: True when the output projection stores its weight as ``[in, out]``
            (GPT-2's ``Conv1D``) instead of ``nn.Linear``'s ``[out, in]``.
        embed_fn: forms the residual stream's input from token ids and position ids; ``None`` means
            "call the ``embed`` module on the ids".
        parallel_residual: True when attention and MLP both read ``resid_pre`` (GPT-NeoX/Pythia
            with ``use_parallel_residual``): such layers have no ``resid_mid``.
        logit_softcap: the config attribute holding a final-logit soft cap, if the family has one.
        tiny_config: builds a small random config of this family for tests (``vocab_size`` given).
        qkv: the q/k/v projections, for ``q_in``/``k_in``/``v_in`` (None: the family has no
            per-head inputs, e.g. post-norm families whose heads do not add to the stream one by one).
        ln_mlp: the norm the MLP reads through (path in one layer), for ``mlp_in``.
        checkpoint_aliases: parameter name -> the key it is saved under in safetensors checkpoints,
            where the two differ (used when loading only some tensors).
    """

    name: str
    model_types: tuple[str, ...]
    base: str
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    attn: str
    attn_out: str
    o_proj: str
    mlp_out: str
    mlp_down: str
    tiny_config: Callable[[int], PretrainedConfig]
    rotary: str | None = None
    o_proj_transposed: bool = False
    embed_fn: EmbedFn | None = None
    parallel_residual: Callable[[PretrainedConfig], bool] = field(default=lambda config: False)
    logit_softcap: str | None = None
    checkpoint_aliases: dict[str, str] = field(default_factory=dict)
    qkv: QKVLayout | None = None
    ln_mlp: str | None = None
    notes: str = ""

    @property
    def per_head_inputs(self) -> bool:
        """Whether heads add to the residual stream one by one and read it through their own
        inputs: the family declares the per-head q/k/v inputs (``qkv``) and the MLP's input norm
        (``ln_mlp``). Post-norm families (Gemma 2, OLMo 2) declare neither."""
        return self.qkv is not None and self.ln_mlp is not None

    # ------------------------------------------------------------------ parameter names
    @property
    def layer_prefix(self) -> str:
        """``"<base>.<layers>."``: what every decoder layer's parameter names start with."""
        return f"{self.base}.{self.layers}."

    def layer_of_parameter(self, name: str) -> int | None:
        """The decoder layer a full parameter name belongs to (None: embedding, final norm, head)."""
        prefix = self.layer_prefix
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    def tied_names(self, config: PretrainedConfig) -> tuple[str, str] | None:
        """``(head name, embedding name)`` when ``config`` ties the unembedding to the embedding
        (one parameter in the whole model; a pipeline's first and last stages each hold a copy)."""
        if not getattr(config, "tie_word_embeddings", False):
            return None
        return f"{self.lm_head}.weight", f"{self.base}.{self.embed}.weight"


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Register a family; returns the spec so a module can write ``SPEC = register_arch(...)``."""
    for model_type in spec.model_types:
        other = _REGISTRY.get(model_type)
        if other is not None and other.name != spec.name:
            raise ValueError(f"model_type {model_type!r} is claimed by both {other.name!r} and {spec.name!r}")
        _REGISTRY[model_type] = spec
    return spec


def registered_archs() -> dict[str, ArchSpec]:
    """Family name -> spec, for every registered family."""
    from interplab.models.arch import load_families

    load_families()
    return {spec.name: spec for spec in _REGISTRY.values()}


def get_arch(name: str) -> ArchSpec:
    families = registered_archs()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(sorted(families))}")
    return families[name]


def arch_for_model_type(model_type: str) -> ArchSpec:
    """The spec for a Hugging Face ``config.model_type``, with a clear error if unsupported."""
    families = registered_archs()
    if model_type not in _REGISTRY:
        supported = sorted({t for spec in families.values() for t in spec.model_types})
        raise ValueError(
            f"model type {model_type!r} is not supported by interplab; supported model types: "
            f"{', '.join(supported)}. Add a family file under interplab/models/arch/ to support it."
        )
    return _REGISTRY[model_type]
