"""The ``partition`` job kind as interplab finds it: the ``interplab.kinds`` entry point ``partition``.

Its spec and runner are in :mod:`.job`; its store views (``dictionaries``, ``exemplars``,
``regions``, ``region_members``, ``partition_match``) in ``views/*.sql``; its picture in :mod:`.plot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from interplab.analyses.partition.job import PartitionRunner, PartitionSpec
from interplab.jobs import register_kind

if TYPE_CHECKING:
    from interplab.store import Store


def plot_run(store: Store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    """Region sizes and nearest-exemplar distances of partition run ``run_id``."""
    from interplab.analyses.partition.plot import plot_partition

    exemplars = store.sql(
        "SELECT region, token, n_members, mean_distance FROM exemplars WHERE run_id = $run_id ORDER BY region",
        {"run_id": run_id},
    ).to_pylist()
    distances = store.sql("SELECT distance FROM regions WHERE run_id = $run_id", {"run_id": run_id}).column("distance")
    meta = store.sql(
        "SELECT site, metric, threshold, n_rows, n_regions FROM dictionaries WHERE run_id = $run_id", {"run_id": run_id}
    ).to_pylist()
    title = f"{run_id} ({store.run(run_id).model})"
    return [plot_partition(exemplars, distances.to_numpy(), meta[0] if meta else {}, output, title=title)]


register_kind("partition", PartitionSpec, PartitionRunner(), plot=plot_run)
