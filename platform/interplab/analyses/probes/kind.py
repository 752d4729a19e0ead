"""The ``probe`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``probe``.

Everything of the kind lives in this folder: its spec and runner in :mod:`.job`, the fit in
:mod:`.fit`, its store views (``probes``, ``probe_weights``) in ``views/*.sql``, its picture in
:mod:`.plot` (drawn by :func:`plot_run` for ``interplab plot RUN_ID``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.probes.job import ProbeRunner, ProbeSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """Accuracy by layer (train, test, majority floor) of probe run ``run_id``."""
    from interplab.analyses.probes.plot import plot_probes

    rows = store.sql("SELECT * FROM probes WHERE run_id = $run_id ORDER BY site, layer", {"run_id": run_id}).to_pylist()
    first = rows[0] if rows else None
    title = f"{run_id} ({store.run(run_id).model})"
    if first is not None:
        title += f"\nprobe of {first['label']!r} ({first['n_classes']} classes) at position {first['position']}"
    return [plot_probes(rows, output, title=title)]


register_kind("probe", ProbeSpec, ProbeRunner(), plot=plot_run)
