"""Region assignment: every row of a selection gets its nearest exemplar (region) and distance.

Windows of the selection are independent, so they run as Ray tasks (at most ``tasks`` at a time,
each reading its own window from the store) when Ray is up and has a CPU free for them, and in
this process otherwise; results come back in window order either way. Each window also returns,
per region, its ``top_k`` rows nearest the exemplar, which :func:`merge_top` reduces to the
dictionary-wide top members (memory: ``K * top_k`` rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from interplab.analyses.partition.dictionary import Dictionary
from interplab.analyses.partition.source import Rows, Selection, Window, read_window

KEY_SCHEMA = pa.schema(
    [
        ("source_run", pa.string()),
        ("prompt_id", pa.int64()),
        ("position", pa.int32()),
        ("head", pa.int32()),
        ("token", pa.string()),
    ]
)


@dataclass
class WindowResult:
    index: int
    regions: pa.Table  # KEY_SCHEMA + region, distance (one row per input row, stream order)
    top: pa.Table  # KEY_SCHEMA + region, distance, stream: up to top_k rows per region
    counts: np.ndarray  # int64 [K]
    distance_sum: np.ndarray  # float64 [K]
    distance_max: np.ndarray  # float32 [K]


def keys_table(rows: Rows) -> pa.Table:
    """The window's row keys in the store's fixed schema (NULL where the selection has no such column)."""
    n = rows.keys.num_rows
    columns = []
    for field in KEY_SCHEMA:
        name = "run_id" if field.name == "source_run" else field.name
        if name in rows.keys.column_names:
            columns.append(rows.keys.column(name).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=KEY_SCHEMA)


def top_rows(region: np.ndarray, distance: np.ndarray, stream: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of each region nearest its exemplar (ties: earlier in the stream first)."""
    order = np.lexsort((stream, distance, region))
    sorted_regions = region[order]
    starts = np.flatnonzero(np.r_[True, sorted_regions[1:] != sorted_regions[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return order[np.arange(len(order)) - first < k]


def assign_rows(rows: Rows, dictionary: Dictionary, window: Window, top_k: int) -> WindowResult:
    region, distance = dictionary.nearest(rows.act)
    keys = keys_table(rows)
    regions = keys.append_column("region", pa.array(region.astype(np.int32))).append_column(
        "distance", pa.array(distance.astype(np.float32))
    )
    stream = window.offset + np.arange(len(region), dtype=np.int64)
    best = pa.array(top_rows(region, distance, stream, top_k))
    top = regions.take(best).append_column("stream", pa.array(stream).take(best))
    k = dictionary.size
    counts = np.bincount(region, minlength=k).astype(np.int64)
    sums = np.bincount(region, weights=distance.astype(np.float64), minlength=k)
    maxima = np.zeros(k, dtype=np.float32)
    np.maximum.at(maxima, region, distance.astype(np.float32))
    return WindowResult(window.index, regions, top, counts, sums, maxima)


def assign_window(store_uri: str, selection: Selection, window: Window, dictionary: Dictionary, top_k: int) -> WindowResult:
    """Read one window from the store and assign it (the body of a Ray task)."""
    from interplab.store import open_store

    store = open_store(store_uri, create=False)
    try:
        return assign_rows(read_window(store, selection, window), dictionary, window, top_k)
    finally:
        store.close()


def assign_windows(
    store_uri: str,
    selection: Selection,
    windows: list[Window],
    dictionary: Dictionary,
    top_k: int,
    tasks: int,
    num_cpus: float = 1.0,
) -> Iterator[WindowResult]:
    """Assign every window, in window order: as Ray tasks where Ray is up with a CPU free, else here."""
    if tasks > 1 and len(windows) > 1 and _ray_has_cpu(num_cpus):
        yield from _on_ray(store_uri, selection, windows, dictionary, top_k, tasks, num_cpus)
        return
    for window in windows:
        yield assign_window(store_uri, selection, window, dictionary, top_k)


def _ray_has_cpu(num_cpus: float) -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized()) and ray.available_resources().get("CPU", 0.0) >= num_cpus


def _on_ray(
    store_uri: str, selection: Selection, windows: list[Window], dictionary: Dictionary, top_k: int, tasks: int, num_cpus: float
) -> Iterator[WindowResult]:
    import ray

    remote = ray.remote(assign_window).options(num_cpus=num_cpus, max_retries=2)
    shared = ray.put(dictionary)
    pending: dict[int, object] = {}
    done: dict[int, WindowResult] = {}
    queue = list(windows)
    next_out = 0
    while next_out < len(windows):
        while queue and len(pending) < tasks:
            window = queue.pop(0)
            pending[window.index] = remote.remote(store_uri, selection, window, shared, top_k)
        by_ref = {ref: index for index, ref in pending.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        for ref in ready:
            index = by_ref[ref]
            done[index] = ray.get(ref)
            del pending[index]
        while next_out in done:  # hand results back in window order, holding as few as possible
            yield done.pop(next_out)
            next_out += 1


def merge_top(parts: list[pa.Table], top_k: int) -> pa.Table:
    """The dictionary-wide ``top_k`` rows per region from the windows' own top rows, with ``rank``."""
    table = pa.concat_tables(parts)
    region = table.column("region").to_numpy()
    distance = table.column("distance").to_numpy()
    stream = table.column("stream").to_numpy()
    keep = top_rows(region, distance, stream, top_k)
    keep = keep[np.lexsort((stream[keep], distance[keep], region[keep]))]
    out = table.take(pa.array(keep))
    r = out.column("region").to_numpy()
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if len(r) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(r)) - np.repeat(starts, np.diff(np.r_[starts, len(r)]))
    return out.append_column("rank", pa.array(rank.astype(np.int32)))
