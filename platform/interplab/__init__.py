"""interplab: mechanistic interpretability on Ray with a Parquet/DuckDB activation store."""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(name: str, **options):
    """Load a model as a :class:`interplab.engine.HookedModel` (see :mod:`interplab.models.loading`)."""
    from interplab.models.loading import load_model as _load

    return _load(name, **options)


__all__ = ["__version__", "load_model"]
