"""The ``grafting`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``grafting``.

Everything of the kind lives in this folder: its spec and runner in :mod:`.job`, its store views
(``grafting``, ``deltas``) in ``views/*.sql``, its figure in :mod:`.plot`
(:func:`~interplab.analyses.grafting.plot.plot_grafting` for ``interplab plot``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.grafting.job import GraftingRunner, GraftingSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """Ranks per variant and eval set, and the extractive scores, of grafting run ``run_id``."""
    from interplab.analyses.grafting.plot import plot_grafting

    return [plot_grafting(store, run_id, output)]


register_kind("grafting", GraftingSpec, GraftingRunner(), plot=plot_run)
