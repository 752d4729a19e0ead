"""Writing one run: idempotent chunk files under the run's staging prefix, then an atomic commit.

Protocol (``docs/store.md``):

1. ``begin_run`` creates ``runs/<id>/run.json`` (create-if-absent) → status ``running``.
2. Every write is one Parquet object with a deterministic name derived from (run, table, chunk[, site,
   layer, head]), written atomically (temp + rename / single PUT). Rewriting a chunk replaces its
   objects, so a retried task never duplicates rows. A chunk-done marker records the chunk's files.
3. ``commit`` lists the run's data objects, and publishes ``runs/<id>/commit.json`` naming every file
   with its row count. Readers build their views only from commit manifests, so an uncommitted or
   crashed run, and any stray temporary file, is invisible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from interplab.store import actfile, codec, fs, layout, reuse
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo, dumps, loads, now_iso

if TYPE_CHECKING:
    from interplab.engine.stream import CaptureChunk
    from interplab.store.store import Store


class RunWriter:
    """Writes the chunks of one run; ``commit()`` publishes them, ``fail(reason)`` marks the run failed.

    As a context manager it commits on normal exit and marks the run failed on an exception.
    Several processes (hosts) may hold a writer for the same run and write different chunks; one of
    them commits once all have finished.
    """

    def __init__(self, store: Store, run_id: str):
        self._store = store
        self._loc = store.location
        self.run_id = run_id
        self._done = False

    @property
    def store(self) -> Store:
        """The store this run is written to (other processes open their own writers on its URI)."""
        return self._store

    @property
    def store_uri(self) -> str:
        """The store's URI: a pipeline's stages open their own writers on this run there."""
        return self._store.uri

    # -- writes --------------------------------------------------------------------------------

    def write_activations(
        self,
        chunk: int | str,
        site: str,
        layer: int | None,
        head: int | None | np.ndarray,
        prompt_id: np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        token: Sequence[str] | pa.Array,
        act: np.ndarray,
        *,
        dtype: str = "float16",
    ) -> FileEntry:
        """Write the rows of one site for one chunk; ``act`` is ``[n, d]``, the others ``[n]``.

        ``head`` is None for whole-stream sites, an int for a single head, or an ``int[n]`` array when
        the rows cover all heads of a layer. ``dtype`` is the storage type (``float16`` default,
        ``float32`` on request). ``token`` is a sequence of str or an Arrow string array. Rewriting the
        same (chunk, site, layer, head) replaces the file. The file is written by
        :mod:`interplab.store.actfile` (the ``act`` bytes go from the array to the file uncopied).
        """
        keys = actfile.KeyColumns.build(prompt_id, position, token_id, token)
        return self.write_activation_rows(chunk, site, layer, head, keys, act, dtype=dtype)

    def write_activation_rows(
        self,
        chunk: int | str,
        site: str,
        layer: int | None,
        head: int | None | np.ndarray,
        keys: actfile.KeyColumns,
        act: np.ndarray,
        *,
        dtype: str = "float16",
    ) -> FileEntry:
        """:meth:`write_activations` with the row keys already built (shared by the sites of a chunk)."""
        self._check_writable()
        key = layout.chunk_key(chunk)
        layout.check_site_kind(site)
        if layer is not None and (not isinstance(layer, (int, np.integer)) or layer < 0):
            raise StoreError(f"layer must be a non-negative int or None, got {layer!r}")
        file_head = int(head) if isinstance(head, (int, np.integer)) and not isinstance(head, bool) else None
        parts = actfile.activation_file(keys, actfile.head_column(head, keys.n), act, dtype)
        layer = None if layer is None else int(layer)
        rel = layout.activation_file(self.run_id, site, layer, file_head, key)
        size = fs.write_parts(self._loc, self._loc.path(rel), parts)
        d = int(act.shape[1])
        schema = layout.schema_hash(actfile.activation_schema(dtype, d))
        return FileEntry(layout.ACTIVATIONS, rel, key, keys.n, size, site, layer, file_head, dtype, d, schema_hash=schema)

    def write_table(self, name: str, table: pa.Table, chunk: str | int = 0) -> FileEntry:
        """Write one chunk of an analysis result table (``patching``, ``baselines``, ``edges``, ...).

        Idempotent per (run, table, chunk): rewriting a chunk replaces it. Known tables (see
        ``layout.KNOWN_SCHEMAS``) are checked and cast to their schema; extra columns are kept.
        """
        self._check_writable()
        layout.check_table(name)
        key = layout.chunk_key(chunk)
        if not isinstance(table, pa.Table):
            raise StoreError(f"write_table({name!r}) needs a pyarrow.Table, got {type(table).__name__}")
        entry = self._write_table_file(name, _conform(name, table, self.run_id), key)
        self.finish_chunk(name, chunk, [entry])
        return entry

    def write_capture_chunk(self, chunk: CaptureChunk, dtype: str = "float16") -> list[FileEntry]:
        """Write an engine ``CaptureChunk`` (see :func:`interplab.store.capture.write_capture_chunk`)."""
        from interplab.store.capture import write_capture_chunk

        return write_capture_chunk(self, chunk, dtype)

    def finish_chunk(self, table: str, chunk: str | int, files: Sequence[FileEntry]) -> None:
        """Record that ``chunk`` of ``table`` is complete with exactly ``files``.

        Files a previous attempt of this chunk wrote and this one did not are deleted, so a rewritten
        chunk replaces the old one. ``written_chunks`` reports only finished chunks.
        """
        self._check_writable()
        key = layout.chunk_key(chunk)
        marker = self._loc.path(layout.chunk_marker(self.run_id, table, key))
        previous = fs.read_bytes(self._loc, marker)
        keep = {f.path for f in files}
        if previous is not None:
            for old in loads(previous, marker).get("files", []):
                if old["path"] not in keep and self._owns(old["path"]):  # never another run's file
                    fs.delete_file(self._loc, self._loc.path(old["path"]))
        record = {"table": table, "chunk": key, "written_at": now_iso(), "files": [_record(f) for f in files]}
        fs.write_bytes(self._loc, marker, dumps(record))

    def add_references(self, chunk: str | int, files: Sequence[FileEntry]) -> None:
        """Record that ``chunk`` reuses ``files`` of other committed runs (each with ``source_run``);
        ``commit`` lists them in this run's manifest. Which of their rows the run shows is its
        ``reused_rows`` table (:mod:`interplab.store.reuse`). Rewriting a chunk's references replaces them."""
        self._check_writable()
        for entry in files:
            source = entry.source_run
            if source is None or source == self.run_id:
                raise StoreError(f"add_references: {entry.path} names no other run as its source_run")
            if not entry.path.startswith(layout.table_dir(entry.table, source) + "/"):
                raise StoreError(f"add_references: {entry.path} is not a file of run {source!r}")
        key = layout.chunk_key(chunk)
        marker = self._loc.path(layout.chunk_marker(self.run_id, reuse.REFERENCES, key))
        record = {"table": reuse.REFERENCES, "chunk": key, "written_at": now_iso(), "files": [_record(f) for f in files]}
        fs.write_bytes(self._loc, marker, dumps(record))

    def _owns(self, rel: str) -> bool:
        return rel.startswith("data/") and f"/run_id={self.run_id}/" in rel

    def written_chunks(self, table: str = layout.ACTIVATIONS) -> set[int | str]:
        """Chunk keys of ``table`` already finished in this run (ints for numbered chunks)."""
        prefix = self._loc.path(layout.chunks_dir(self.run_id), table)
        return {
            layout.parse_chunk_key(info.base_name[: -len(".json")])
            for info in fs.list_files(self._loc, prefix)
            if info.base_name.endswith(".json") and fs.TMP_MARK not in info.base_name
        }

    def _write_table_file(self, name: str, table: pa.Table, key: str) -> FileEntry:
        rel = layout.table_file(name, self.run_id, key)
        size = fs.write_parquet(self._loc, self._loc.path(rel), table, compression="zstd")
        return FileEntry(name, rel, key, table.num_rows, size, schema_hash=layout.schema_hash(table.schema))

    # -- status --------------------------------------------------------------------------------

    def commit(self, metadata: dict[str, Any] | None = None) -> RunInfo:
        """Publish the run atomically: after this, every written file is visible, before it none is."""
        self._check_writable()
        run_path = self._loc.path(layout.run_dir(self.run_id))
        if fs.exists(self._loc, f"{run_path}/{layout.FAILED_FILE}"):
            raise StoreError(f"run {self.run_id!r} is marked failed; reopen it with resume_run() before committing")
        entries = self._collect_files()
        record = {
            "run_id": self.run_id,
            "committed_at": now_iso(),
            "metadata": metadata or {},
            "files": [_record(e) for e in entries],
        }
        self._index_content_key()
        if not fs.create_exclusive(self._loc, f"{run_path}/{layout.COMMIT_FILE}", dumps(record)):
            raise StoreError(f"run {self.run_id!r} is already committed")
        self._done = True
        return self._store.run(self.run_id)

    def fail(self, reason: str) -> None:
        """Mark the run failed; its staging data stays until ``gc`` (or a resume) and is never visible."""
        if self._done:
            return
        record = {"reason": str(reason)[:2000], "failed_at": now_iso(), "host": os.uname().nodename}
        fs.write_bytes(self._loc, self._loc.path(layout.run_dir(self.run_id), layout.FAILED_FILE), dumps(record))
        self._done = True

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._done:
            return
        if exc is not None:
            self.fail(f"{type(exc).__name__}: {exc}")
        else:
            self.commit()

    # -- internals -----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._done:
            raise StoreError(f"run {self.run_id!r}: this writer is already committed or failed")
        if fs.exists(self._loc, self._loc.path(layout.run_dir(self.run_id), layout.COMMIT_FILE)):
            raise StoreError(f"run {self.run_id!r} is committed; committed runs are immutable")

    def _index_content_key(self) -> None:
        """Before the commit: the run's content-key index record (``store/reuse.py``), if it has a key.
        Written first, so every committed run with a key is indexed; a record of a run that then
        fails to commit is ignored by readers."""
        raw = fs.read_bytes(self._loc, self._loc.path(layout.run_dir(self.run_id), layout.RUN_FILE))
        record = loads(raw, layout.RUN_FILE) if raw is not None else {}
        key = (record.get("provenance") or {}).get(reuse.CONTENT_KEY)
        if isinstance(key, str) and key:
            info = {"kind": record.get("kind"), "model": record.get("model"), "written_at": now_iso()}
            reuse.write_index_entry(self._loc, key, self.run_id, info)

    def _collect_files(self) -> list[FileEntry]:
        marked: dict[str, FileEntry] = {}
        references: dict[str, FileEntry] = {}
        prefix = self._loc.path(layout.chunks_dir(self.run_id))
        for info in fs.list_files(self._loc, prefix):
            if info.base_name.endswith(".json") and fs.TMP_MARK not in info.base_name:
                for described in reuse.marker_entries(fs.read_bytes(self._loc, info.path) or b"{}", info.path):
                    if described.source_run is not None:
                        references[described.path] = described
                    else:
                        marked[described.path] = described
        entries = list(references.values())
        root_len = len(self._loc.root) + 1
        for table in fs.list_dirs(self._loc, self._loc.path("data")):
            for info in fs.list_files(self._loc, self._loc.path(layout.table_dir(table, self.run_id))):
                rel = info.path[root_len:]
                if layout.file_chunk_key(rel) is None:
                    continue  # temporary or foreign file
                entry = marked.get(rel)
                if entry is None or entry.bytes != info.size:
                    entry = _describe(self._loc, table, rel)
                entries.append(entry)
        return sorted(entries, key=lambda e: e.path)


def _record(entry: FileEntry) -> dict[str, Any]:
    """A file entry as JSON (``source_run`` and ``schema_hash`` only where they are set)."""
    out = dict(vars(entry))
    for optional in ("source_run", "schema_hash"):
        if out.get(optional) is None:
            out.pop(optional, None)
    return out


def _describe(loc: fs.Location, table: str, rel: str) -> FileEntry:
    """A FileEntry for a data file no chunk marker describes (read from its footer)."""
    with loc.fs.open_input_file(loc.path(rel)) as f:
        meta = pq.read_metadata(f)
    key = layout.file_chunk_key(rel) or ""
    size = loc.fs.get_file_info(loc.path(rel)).size
    schema = layout.schema_hash(meta.schema.to_arrow_schema())
    if table != layout.ACTIVATIONS:
        return FileEntry(table, rel, key, meta.num_rows, size, schema_hash=schema)
    kv = meta.metadata or {}
    parts = layout.parse_partitions(rel)
    layer = None if parts.get("layer", layout.NULL_PARTITION) == layout.NULL_PARTITION else int(parts["layer"])
    base = rel.rsplit("/", 1)[-1][: -len(".parquet")]
    head = int(base.rsplit("-h", 1)[1]) if "-h" in base else None
    return FileEntry(
        table,
        rel,
        key,
        meta.num_rows,
        size,
        parts.get("site"),
        layer,
        head,
        kv.get(codec.META_DTYPE, b"float16").decode(),
        int(kv.get(codec.META_DIM, b"0")),
        schema_hash=schema,
    )


def _conform(name: str, table: pa.Table, run_id: str) -> pa.Table:
    if "run_id" in table.column_names:
        values = set(table.column("run_id").to_pylist())
        if values - {run_id}:
            raise StoreError(f"write_table({name!r}): run_id column holds {sorted(values)}, not {run_id!r}")
        table = table.drop_columns(["run_id"])
    schema = layout.KNOWN_SCHEMAS.get(name)
    if schema is None:
        return table
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise StoreError(f"write_table({name!r}): missing columns {missing}; expected {schema.names}")
    known = []
    for field in schema:
        try:
            known.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"write_table({name!r}): column {field.name!r} is not {field.type}: {exc}") from None
    extra = [c for c in table.column_names if c not in schema.names]
    return pa.table(known + [table.column(c) for c in extra], names=schema.names + extra)
