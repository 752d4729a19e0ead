"""One small file per model family, each declaring an :class:`ArchSpec` and registering it.

Adding a family means adding one file here and listing it in ``_FAMILY_MODULES``; nothing in the
engine changes.
"""

from __future__ import annotations

import importlib

from interplab.models.arch.base import ArchSpec, arch_for_model_type, get_arch, registered_archs

_FAMILY_MODULES = ("gpt2", "llama", "qwen2", "gpt_neox", "gemma2", "olmo2")


def load_families() -> None:
    """Import every family module so each registers its spec (idempotent, no other side effect)."""
    for name in _FAMILY_MODULES:
        importlib.import_module(f"interplab.models.arch.{name}")


__all__ = ["ArchSpec", "arch_for_model_type", "get_arch", "load_families", "registered_archs"]
