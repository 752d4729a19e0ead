"""Discovery of job kinds: import a fixed list of modules, each of which calls ``register_kind``.

Built-in kinds live in :data:`KIND_MODULES`; modules that are not importable yet (an analysis whose
issue has not landed) are skipped. A lab can add its own kinds without editing interplab by naming
their modules in ``$INTERPLAB_JOB_KINDS`` (comma-separated); those must import, and the variable is
passed on to Ray workers and submitted jobs.
"""

from __future__ import annotations

import importlib
import os

KIND_MODULES = (
    "interplab.jobs.capture",
    "interplab.analyses.patching.job",
    "interplab.analyses.circuits.job",
    "interplab.analyses.grafting.job",
)
EXTRA_KINDS_ENV = "INTERPLAB_JOB_KINDS"

_loaded: set[str] = set()


def _optional(module: str) -> bool:
    """True if ``module`` is simply absent (not yet landed); errors inside it still raise."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module == missing or module.startswith(missing + "."):
            return False
        raise
    return True


def extra_kind_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(EXTRA_KINDS_ENV, "").split(",") if m.strip()]


def load_kinds() -> None:
    """Import every kind module once (cheap after the first call)."""
    for module in KIND_MODULES:
        if module not in _loaded:
            _optional(module)
            _loaded.add(module)
    for module in extra_kind_modules():
        if module not in _loaded:
            importlib.import_module(module)
            _loaded.add(module)
