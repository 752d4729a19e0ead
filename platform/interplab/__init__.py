"""interplab: mechanistic interpretability on Ray with a Parquet/DuckDB activation store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interplab.serve.client import Session

__version__ = "0.1.0"


def load_model(name: str, **options):
    """Load a model as a :class:`interplab.engine.HookedModel` (see :mod:`interplab.models.loading`)."""
    from interplab.models.loading import load_model as _load

    return _load(name, **options)


def connect(url: str, token: str | None = None, **options: Any) -> Session:
    """A session with a lab's model service (see :func:`interplab.serve.client.connect`, ``docs/serving.md``)."""
    from interplab.serve.client import connect as _connect

    return _connect(url, token, **options)


__all__ = ["__version__", "connect", "load_model"]
