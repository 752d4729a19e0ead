"""Reuse of committed results: the content-key index, and runs that reference other runs' rows.

**Content-key index.** A job's content key (:mod:`interplab.jobs.reuse`) is recorded in its run's
provenance (``content_key``). Just before a run's ``commit.json`` is published, the writer puts a
small record at ``index/content/<key>/<run_id>.json``; :func:`runs_with_key` lists that one folder
and keeps the runs whose commit manifest exists (an index record of a run that never committed is
ignored), so a lookup reads a handful of small objects whatever the number of runs.
``scan=True`` also reads every run record (for runs whose index record is missing, e.g. copied in
from elsewhere); :func:`reindex` writes the missing records.

**References.** A run may list, as its own, activation files of other committed runs: their
``FileEntry`` carries ``source_run``. Which rows of them belong to the run, and under which prompt
id, is the run's ``reused_rows`` table (:data:`REUSED_ROWS_SCHEMA`): one row per
(source run, site, layer, source prompt id, position) with the run's own ``prompt_id``. The SQL views
(:func:`referenced_select`, used by :mod:`interplab.store.query`) and :func:`read_activation_file`
(``Store.export``) apply it, so the referencing run appears whole, under its own ``run_id`` and
prompt ids, and nothing is copied. Chunks record the files they reference in chunk markers of the
pseudo-table :data:`REFERENCES`; ``commit`` adds them to the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from interplab.store import fs, layout
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo, dumps, loads, now_iso

if TYPE_CHECKING:
    from interplab.store.store import Store

INDEX_DIR = "index/content"
CONTENT_KEY = "content_key"  # the provenance field
REFERENCES = "references"  # chunk-marker pseudo-table: files of other runs a chunk reuses
REUSED_ROWS = "reused_rows"  # table: which rows of which source run, under which prompt id
REUSED_ROWS_SCHEMA = pa.schema(
    [
        ("source_run", pa.string()),
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("source_prompt_id", pa.int64()),
        ("prompt_id", pa.int64()),
        ("position", pa.int32()),
    ]
)
_KEY = re.compile(r"^[0-9a-f]{16,64}$")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise StoreError(f"invalid content key {key!r}: expected 16-64 lower-case hex digits")
    return key


def index_entry(key: str, run_id: str) -> str:
    """The index record of ``run_id`` under ``key`` (relative to the store root)."""
    return f"{INDEX_DIR}/{check_key(key)}/{layout.check_run_id(run_id)}.json"


def write_index_entry(loc: fs.Location, key: str, run_id: str, record: dict[str, Any]) -> None:
    fs.write_bytes(loc, loc.path(index_entry(key, run_id)), dumps({**record, "run_id": run_id, "content_key": key}))


def runs_with_key(store: Store, key: str, *, scan: bool = False) -> list[RunInfo]:
    """Committed runs of ``store`` whose content key is ``key``, newest commit first."""
    check_key(key)
    loc = store.location
    run_ids: set[str] = set()
    for info in fs.list_files(loc, loc.path(INDEX_DIR, key)):
        if info.base_name.endswith(".json") and fs.TMP_MARK not in info.base_name:
            run_ids.add(info.base_name[: -len(".json")])
    found: dict[str, RunInfo] = {}
    for run_id in sorted(run_ids):
        try:
            run = store.run(run_id)
        except StoreError:  # an index record of a deleted run
            continue
        if run.status == "committed" and run.provenance.get(CONTENT_KEY) == key:
            found[run_id] = run
    if scan:
        for run in store.runs("committed"):
            if run.provenance.get(CONTENT_KEY) == key:
                found.setdefault(run.run_id, run)
    return sorted(found.values(), key=lambda r: (r.committed_at or "", r.run_id), reverse=True)


def reindex(store: Store) -> int:
    """Write the index record of every committed run that has a content key; returns how many."""
    written = 0
    for run in store.runs("committed"):
        key = run.provenance.get(CONTENT_KEY)
        if isinstance(key, str) and _KEY.match(key):
            path = store.location.path(index_entry(key, run.run_id))
            if not fs.exists(store.location, path):
                write_index_entry(store.location, key, run.run_id, {"kind": run.kind, "written_at": now_iso()})
                written += 1
    return written


# -- references -----------------------------------------------------------------------------------


def referenced(info: RunInfo) -> list[FileEntry]:
    """The files of other runs that ``info`` reuses."""
    return [e for e in info.files if e.source_run is not None]


def reuse_map(loc: fs.Location, info: RunInfo) -> pa.Table:
    """The ``reused_rows`` of a committed run (empty when it reuses nothing)."""
    tables = []
    for entry in info.files:
        if entry.table == REUSED_ROWS:
            with loc.fs.open_input_file(loc.path(entry.path)) as f:
                tables.append(pq.read_table(f, schema=REUSED_ROWS_SCHEMA))
    if not tables:
        return REUSED_ROWS_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def remap(table: pa.Table, mapping: pa.Table, entry: FileEntry) -> pa.Table:
    """The rows of ``table`` (read from ``entry``, a file of ``entry.source_run``) that ``mapping``
    selects, with ``prompt_id`` replaced by the referencing run's. A source prompt mapped to several
    prompts (a dataset with duplicates) yields its rows once per prompt."""
    import pyarrow.compute as pc  # only when reading reused rows: listing runs never needs it

    layer_match = pc.is_null(mapping["layer"]) if entry.layer is None else pc.equal(mapping["layer"], entry.layer)
    mine = mapping.filter(
        pc.and_(pc.and_(pc.equal(mapping["source_run"], entry.source_run), pc.equal(mapping["site"], entry.site)), layer_match)
    )
    map_keys = _row_key(mine["source_prompt_id"], mine["position"])
    order = np.argsort(map_keys, kind="stable")
    map_keys = map_keys[order]
    new_ids = mine["prompt_id"].to_numpy(zero_copy_only=False)[order]
    keys = _row_key(table["prompt_id"], table["position"])
    lo = np.searchsorted(map_keys, keys, "left")
    counts = np.searchsorted(map_keys, keys, "right") - lo
    rows = np.repeat(np.arange(len(keys)), counts)
    starts = np.repeat(lo, counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = table.take(pa.array(rows, pa.int64()))
    column = out.schema.get_field_index("prompt_id")
    return out.set_column(column, "prompt_id", pa.array(new_ids[starts + within], pa.int64()))


def _row_key(prompt_id: pa.ChunkedArray | pa.Array, position: pa.ChunkedArray | pa.Array) -> np.ndarray:
    p = np.asarray(prompt_id.to_numpy(zero_copy_only=False), dtype=np.int64)
    q = np.asarray(position.to_numpy(zero_copy_only=False), dtype=np.int64)
    return (p << 32) | (q & 0xFFFFFFFF)


def read_activation_file(loc: fs.Location, info: RunInfo, entry: FileEntry, columns: list[str]) -> pa.Table:
    """``columns`` of one activation file of run ``info``, as that run shows it (a referenced file:
    only the rows the run reuses, under its prompt ids)."""
    wanted = list(dict.fromkeys([*columns, "prompt_id", "position"])) if entry.source_run else columns
    with loc.fs.open_input_file(loc.path(entry.path)) as f:
        table = pq.read_table(f, columns=wanted)
    if entry.source_run is None:
        return table
    return remap(table, reuse_map(loc, info), entry).select(columns)


def referenced_select(run_id: str, files: str, mapping: str, act: str, columns: Iterable[str]) -> str:
    """SQL: the rows run ``run_id`` reuses from the files of relation ``files`` (hive ``run_id`` =
    the source run), joined to its ``reused_rows`` relation ``mapping``, under its own run and
    prompt ids. ``act`` is the decoding expression of ``a.act``; ``columns`` the key columns."""
    picks = []
    for column in columns:
        if column == "run_id":
            picks.append("'" + run_id.replace("'", "''") + "' AS run_id")
        elif column == "prompt_id":
            picks.append("m.prompt_id AS prompt_id")
        else:
            picks.append(f"a.{column} AS {column}")
    return (
        f"SELECT {', '.join(picks)}, {act} AS act FROM {files} AS a JOIN {mapping} AS m "
        "ON a.run_id = m.source_run AND a.site = m.site AND a.layer IS NOT DISTINCT FROM m.layer "
        "AND a.prompt_id = m.source_prompt_id AND a.position = m.position"
    )


def marker_entries(raw: bytes | None, what: str) -> list[FileEntry]:
    """The file entries a chunk marker lists."""
    if raw is None:
        return []
    return [FileEntry.from_dict(f) for f in loads(raw, what).get("files", [])]
