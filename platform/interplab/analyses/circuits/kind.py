"""The ``circuit`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``circuit``.

Everything of the kind lives in this folder: its spec and runner in :mod:`.job`, its store views
(``edges``, ``circuits``, ``faithfulness``, ``circuit_summary``) in ``views/*.sql``, its pictures in
:mod:`.plot` (:func:`~interplab.analyses.circuits.plot.plot_circuit_run` for ``interplab plot``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.circuits.job import CircuitRunner, CircuitSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """The circuit diagram of ``method`` (default: the run's first) and the faithfulness curves."""
    from interplab.analyses.circuits.plot import plot_circuit_run

    return plot_circuit_run(store, run_id, output, method=method)


register_kind("circuit", CircuitSpec, CircuitRunner(), plot=plot_run)
