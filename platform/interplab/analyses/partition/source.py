"""The activation rows a partition reads, from committed store data, in a fixed stream order.

A :class:`Selection` is one SELECT over the store's views returning at least ``prompt_id``,
``position`` and ``act`` (plus ``run_id``, ``head``, ``token`` where it has them): the rows of one
site of a committed capture run (:func:`run_selection`), or any query (:func:`sql_selection`). Rows
are streamed in *windows* of consecutive prompt ids (:func:`plan_windows`), ordered by
``(run_id, prompt_id, position, head)``, so memory never holds more than one window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from interplab.engine.sites import Site

if TYPE_CHECKING:
    from interplab.store import Store

KEY_COLUMNS = ("run_id", "prompt_id", "position", "head", "token")
REQUIRED = ("prompt_id", "position", "act")


class SourceError(ValueError):
    """A selection that does not name readable activation rows (the message says how to fix it)."""


@dataclass(frozen=True)
class Selection:
    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def wrapped(self, outer: str) -> str:
        return outer.replace("{src}", f"({self.sql}) AS src")


@dataclass(frozen=True)
class Window:
    """Prompt ids ``lo..hi`` (inclusive) holding ``rows`` rows, starting at stream row ``offset``."""

    index: int
    lo: int
    hi: int
    rows: int
    offset: int


@dataclass
class Rows:
    """One window's rows: their keys (Arrow columns, ``KEY_COLUMNS`` that the selection has) and ``act [n, d]``."""

    keys: pa.Table
    act: np.ndarray


def run_selection(store: Store, run_id: str, site: str) -> Selection:
    """The rows of ``site`` (``resid_post.5``, ``z.3.1``) of the committed run ``run_id``."""
    info = store.run(run_id)  # StoreError names an unknown run
    if info.status != "committed":
        raise SourceError(f"run {run_id!r} is {info.status}; partition a committed capture run")
    parsed = Site.parse(site)
    stored = {(e.site, e.layer) for e in info.files if e.site is not None}
    if (parsed.kind.value, parsed.layer) not in stored:
        have = ", ".join(sorted(f"{s}" + ("" if layer is None else f".{layer}") for s, layer in stored)) or "none"
        raise SourceError(f"run {run_id!r} has no activations of site {site!r}; it has: {have}")
    sql = (
        "SELECT run_id, prompt_id, position, head, token, act FROM activations "
        "WHERE run_id = $run_id AND site = $site_kind AND layer IS NOT DISTINCT FROM $site_layer"
    )
    params: dict[str, Any] = {"run_id": run_id, "site_kind": parsed.kind.value, "site_layer": parsed.layer}
    if parsed.head is not None:
        sql += " AND head = $site_head"
        params["site_head"] = parsed.head
    return Selection(sql, params, f"{site} of run {run_id}")


def sql_selection(store: Store, query: str) -> Selection:
    """Any read-only query over the store's views that returns ``prompt_id``, ``position`` and ``act``."""
    selection = Selection(query.strip().rstrip(";"), {}, "sql")
    columns = store.sql(selection.wrapped("SELECT * FROM {src} LIMIT 0")).column_names
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SourceError(
            f"the sql selection returns no {', '.join(missing)} column(s) (it returns {', '.join(columns)}); "
            "select at least prompt_id, position and act, e.g. SELECT run_id, prompt_id, position, token, act FROM activations WHERE ..."
        )
    return selection


def key_columns(store: Store, selection: Selection) -> list[str]:
    columns = store.sql(selection.wrapped("SELECT * FROM {src} LIMIT 0"), selection.params or None).column_names
    return [c for c in KEY_COLUMNS if c in columns]


def input_runs(store: Store, selection: Selection) -> list[str]:
    """The run ids the selection reads (empty where it has no ``run_id`` column)."""
    if "run_id" not in key_columns(store, selection):
        return []
    table = store.sql(selection.wrapped("SELECT DISTINCT run_id FROM {src} ORDER BY run_id"), selection.params or None)
    return [str(r) for r in table.column("run_id").to_pylist() if r is not None]


def plan_windows(store: Store, selection: Selection, window_rows: int) -> list[Window]:
    """Consecutive prompt-id ranges of about ``window_rows`` rows each (a prompt is never split)."""
    counts = store.sql(
        selection.wrapped("SELECT prompt_id, count(*) AS n FROM {src} GROUP BY prompt_id ORDER BY prompt_id"),
        selection.params or None,
    )
    ids = counts.column("prompt_id").to_numpy(zero_copy_only=False)
    ns = counts.column("n").to_numpy(zero_copy_only=False)
    if len(ids) == 0:
        raise SourceError(f"the selection ({selection.description}) has no rows")
    windows: list[Window] = []
    start, rows, offset = 0, 0, 0
    for i, n in enumerate(ns):
        rows += int(n)
        if rows >= window_rows or i == len(ns) - 1:
            windows.append(Window(len(windows), int(ids[start]), int(ids[i]), rows, offset))
            offset += rows
            start, rows = i + 1, 0
    return windows


def read_window(store: Store, selection: Selection, window: Window) -> Rows:
    """The rows of ``window`` in stream order."""
    keys = key_columns(store, selection)
    order = ", ".join(c for c in ("run_id", "prompt_id", "position", "head") if c in keys)
    table = store.sql(
        selection.wrapped(
            f"SELECT {', '.join(keys)}, act FROM {{src}} WHERE prompt_id BETWEEN $window_lo AND $window_hi ORDER BY {order}"
        ),
        {**selection.params, "window_lo": window.lo, "window_hi": window.hi},
    )
    return Rows(table.drop_columns(["act"]), act_matrix(table.column("act")))


def act_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An ``act`` column (``FLOAT[d]`` or ``FLOAT[]``) as ``float32 [n, d]``."""
    array = column.combine_chunks()
    n = len(array)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if array.null_count:
        raise SourceError("the act column has NULL rows; select rows that hold activations")
    if pa.types.is_fixed_size_list(array.type):
        d = array.type.list_size
    else:
        lengths = np.unique(np.asarray(array.value_lengths()))
        if len(lengths) != 1:
            raise SourceError(f"the act column mixes widths {lengths.tolist()}; select one site")
        d = int(lengths[0])
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, d)


def sample_rows(store: Store, selection: Selection, windows: list[Window], size: int, seed: int) -> np.ndarray:
    """``size`` rows drawn without replacement (seeded) from the whole selection (one pass over it)."""
    total = sum(w.rows for w in windows)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts = []
    for window in windows:
        mine = chosen[(chosen >= window.offset) & (chosen < window.offset + window.rows)] - window.offset
        if len(mine):
            parts.append(read_window(store, selection, window).act[mine])
    return np.concatenate(parts)
