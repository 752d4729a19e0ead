"""A selection of the store's committed files as a Ray Dataset, for ``map_batches`` over a cluster.

::

    ds = to_ray_dataset(store, "activations", where="site = 'resid_post' AND layer = 6")
    ds = to_ray_dataset(store, "SELECT run_id FROM runs WHERE model = 'SmolLM2-135M'")       # a query
    stats = ds.map_batches(lambda b: {"n": [len(b)], "sum": [act_matrix(b).sum(0)]}, batch_format="pyarrow")

The files are exactly those named by the committed runs' manifests (``commit.json``): uncommitted
runs, temporary files and orphaned chunks are never read. A selection is

* a **table name** (``activations``, ``prompts``, ``patching``, ...), optionally with ``where``: a SQL
  condition on ``run_id``, ``site`` and ``layer`` (``run_id`` only for result tables), evaluated over
  the manifests, not the data, so it costs nothing however big the store is; or
* a **query** (``SELECT ...``, read-only, run by :meth:`Store.sql` in its sandbox) whose result has a
  ``run_id`` column and optionally ``site`` and ``layer``: the files of ``table`` whose partition
  matches one of its rows.

A file another run reuses (its manifest entry has ``source_run``) is read once, under the run that
wrote it. Each file is read by one Ray task (pyarrow, on the store's own filesystem: local or S3, with the
workers' AWS variables), which adds ``run_id``, ``site`` and ``layer`` from the manifest and, with
``decode=True`` (the default), turns ``act`` into ``float32`` vectors (Arrow ``FixedSizeList<float>[d]``);
:func:`act_matrix` gives a batch's vectors as a numpy ``[n, d]`` array in any batch format.
Needs Ray Data (``ray[data]``: pandas; a dependency of the package).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from interplab.store import codec, layout
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry

if TYPE_CHECKING:
    import ray.data

    from interplab.store.store import Store

_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")
_QUERY = re.compile(r"^\s*(select|with|from)\b", re.IGNORECASE)


def to_ray_dataset(
    store: Store | str,
    selection: str = layout.ACTIVATIONS,
    *,
    where: str | None = None,
    params: Mapping[str, Any] | None = None,
    table: str = layout.ACTIVATIONS,
    decode: bool = True,
) -> ray.data.Dataset:
    """A Ray Dataset over the committed files of ``selection`` (see the module docstring), one block
    per file. ``params`` bind ``$name`` parameters of ``where`` or of the query."""
    from interplab.store.store import open_store

    if isinstance(store, str):
        store = open_store(store, create=False)
    entries = selection_files(store, selection, where=where, params=params, table=table)
    if not entries:
        raise StoreError(f"selection {selection!r}{f' WHERE {where}' if where else ''} matches no committed files")
    try:
        import ray.data
    except ImportError as exc:
        raise StoreError(f"to_ray_dataset needs Ray Data (pip install 'ray[data]'): {exc}") from None
    items = [_item(e) for e in entries]
    loc = store.location
    read = functools.partial(read_files, filesystem=loc.fs, root=loc.root, decode=decode)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="pyarrow", zero_copy_batch=True
    )


def selection_files(
    store: Store,
    selection: str,
    *,
    where: str | None = None,
    params: Mapping[str, Any] | None = None,
    table: str = layout.ACTIVATIONS,
) -> list[FileEntry]:
    """The committed files a selection reads, in manifest order (runs oldest first)."""
    if not isinstance(selection, str) or not selection.strip():
        raise StoreError("selection must be a table name like 'activations' or a SELECT query")
    committed = store.runs(status="committed")
    if _QUERY.match(selection):
        if where is not None:
            raise StoreError("where= applies to a table name; put the condition in the query instead")
        return _query_files(store, committed, selection, params, table)
    name = selection.strip()
    if not _IDENT.match(name):
        raise StoreError(f"selection {selection!r}: expected a table name (e.g. 'activations') or a SELECT query")
    entries = [e for run in committed for e in run.files if e.table == name and not _reference(e)]
    if not entries:
        tables = sorted({e.table for run in committed for e in run.files})
        if name not in tables:
            raise StoreError(f"no committed table {name!r} in store {store.uri}; tables: {', '.join(tables) or 'none'}")
    if where is None:
        return entries
    return _filter_entries(name, entries, where, params)


def read_files(batch: pa.Table, *, filesystem: pafs.FileSystem, root: str, decode: bool) -> pa.Table:
    """Read the files a batch of selection items names (the ``map_batches`` body of :func:`to_ray_dataset`)."""
    out = []
    for item in batch.to_pylist():
        with filesystem.open_input_file(f"{root}/{item['path']}") as f:
            data = pq.read_table(f)
        n = data.num_rows
        data = data.append_column("run_id", pa.array([item["run_id"]] * n, pa.string()))
        if item["table"] == layout.ACTIVATIONS:
            data = data.append_column("site", pa.array([item["site"]] * n, pa.string()))
            data = data.append_column("layer", pa.array([item["layer"]] * n, pa.int32()))
            if decode:
                d = int(item["d"])
                flat = codec.decode_act(data["act"], item["dtype"] or "float16", d).reshape(-1)
                act = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d)
                data = data.set_column(data.schema.get_field_index("act"), "act", act)
        out.append(data)
    return pa.concat_tables(out) if out else pa.table({})


def act_matrix(batch: Any, dtype: str | None = None) -> np.ndarray:
    """A batch's ``act`` as ``float32[n, d]``: from a pyarrow Table/RecordBatch or a dict of numpy
    arrays (Ray's ``"numpy"`` format), decoded (``FixedSizeList``/tensor) or raw bytes (then ``dtype``,
    ``float16`` or ``float32``, says how they were stored)."""
    col = batch["act"]
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_fixed_size_binary(col.type) or pa.types.is_binary(col.type):
            return _raw(col, dtype)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            d = col.type.list_size
            return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
        return np.asarray(col.to_pylist(), dtype=np.float32)  # another list-like Arrow type
    arr = np.asarray(col)
    if arr.dtype == object:
        if len(arr) and isinstance(arr[0], (bytes, bytearray, memoryview)):
            return _raw(pa.array(list(arr), pa.binary()), dtype)
        return np.stack([np.asarray(v, dtype=np.float32) for v in arr]) if len(arr) else np.zeros((0, 0), np.float32)
    if arr.dtype.kind == "S":
        return _raw(pa.array(list(arr), pa.binary()), dtype)
    return arr.astype(np.float32, copy=False).reshape(len(arr), -1)


def _raw(col: pa.Array | pa.ChunkedArray, dtype: str | None) -> np.ndarray:
    if dtype is None:
        raise StoreError("act holds raw stored bytes: pass dtype='float16' or 'float32' (the run's FileEntry.dtype)")
    codec.check_dtype(dtype)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    widths = {c.type.byte_width for c in chunks if pa.types.is_fixed_size_binary(c.type)}
    width = widths.pop() if widths else len(chunks[0][0].as_py()) if len(col) else 0
    d = width // np.dtype(dtype).itemsize
    return codec.decode_act(col, dtype, d)


def _reference(entry: FileEntry) -> bool:
    """A file of another run that this run reuses: read once, under the run that wrote it."""
    return getattr(entry, "source_run", None) is not None


def _item(entry: FileEntry) -> dict[str, Any]:
    parts = layout.parse_partitions(entry.path)
    return {
        "path": entry.path,
        "table": entry.table,
        "run_id": parts.get("run_id"),
        "site": entry.site,
        "layer": entry.layer,
        "dtype": entry.dtype,
        "d": entry.d,
    }


def _partition_table(name: str, entries: list[FileEntry]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "run_id": pa.array([layout.parse_partitions(e.path).get("run_id") for e in entries], pa.string())
    }
    if name == layout.ACTIVATIONS:
        columns["site"] = pa.array([e.site for e in entries], pa.string())
        columns["layer"] = pa.array([e.layer for e in entries], pa.int32())
    columns["_interplab_file"] = pa.array(range(len(entries)), pa.int64())
    return pa.table(columns)


def _filter_entries(name: str, entries: list[FileEntry], where: str, params: Mapping[str, Any] | None) -> list[FileEntry]:
    """Evaluate ``where`` over one row per file (its partition values) in a locked DuckDB session."""
    import duckdb

    from interplab.store.query import check_query

    partitions = _partition_table(name, entries)
    allowed = [c for c in partitions.column_names if not c.startswith("_")]
    query = f"SELECT _interplab_file FROM {name} WHERE ({where})"
    check_query(query, [name])
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.register(name, partitions)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        rows = con.execute(query, dict(params) if params else None).fetchall()
    except duckdb.BinderException as exc:
        raise StoreError(f"where={where!r}: a selection filter may use only {', '.join(allowed)} ({_first(exc)})") from None
    except duckdb.Error as exc:
        raise StoreError(f"where={where!r}: {_first(exc)}") from None
    finally:
        con.close()
    keep = {int(r[0]) for r in rows}
    return [e for i, e in enumerate(entries) if i in keep]


def _query_files(store: Store, committed: list[Any], query: str, params: Mapping[str, Any] | None, table: str) -> list[FileEntry]:
    result = store.sql(query, dict(params) if params else None)
    if "run_id" not in result.column_names:
        raise StoreError(f"a selection query must return a run_id column (and optionally site, layer); got {result.column_names}")
    keys = [c for c in ("run_id", "site", "layer") if c in result.column_names]
    wanted = {tuple(row[k] for k in keys) for row in result.select(keys).to_pylist()}
    out = []
    for run in committed:
        for e in run.files:
            if e.table != table or _reference(e):
                continue
            values = {"run_id": run.run_id, "site": e.site, "layer": e.layer}
            if tuple(values[k] for k in keys) in wanted:
                out.append(e)
    return out


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
