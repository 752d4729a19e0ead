"""The ``patching`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``patching``.

Everything of the kind lives in this folder: its spec and runner in :mod:`.job`, its store views
(``patching``, ``baselines``) in ``views/*.sql``, its picture in :mod:`.plot` (drawn by
:func:`plot_run` for ``interplab plot RUN_ID``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.patching.job import PatchingRunner, PatchingSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """Layers x tokens heatmaps of patching run ``run_id`` (one panel per sweep and method)."""
    from interplab.analyses.patching.plot import plot_patching

    rows = store.sql(
        "SELECT sweep, method, layer, position, head, value, normalized FROM patching WHERE run_id = $run_id", {"run_id": run_id}
    ).to_pylist()
    tokens = store.sql("SELECT tokens FROM prompts WHERE run_id = $run_id AND prompt_id = 0", {"run_id": run_id}).to_pylist()
    title = f"{run_id} ({store.run(run_id).model})"
    return [plot_patching(rows, tokens[0]["tokens"] if tokens else [], output, title=title)]


register_kind("patching", PatchingSpec, PatchingRunner(), plot=plot_run)
