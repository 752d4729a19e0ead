"""Read-only SQL over committed data: the safety check, the DuckDB session and its views.

Safety model (``docs/store.md``), three independent layers:

1. **Statement check.** DuckDB itself parses the query; exactly one statement of type SELECT is
   allowed. Its parse tree (``json_serialize_sql``) is walked: every table reference must be one of
   the store's views or a CTE of the query, and only the table functions ``range``,
   ``generate_series`` and ``unnest`` may be called, so no ``read_csv``/``read_parquet``/``glob``,
   no ``'/etc/passwd'`` replacement scans, no ``query()``.
2. **Locked session.** The views are created first; then the connection gets
   ``enable_external_access=false`` (with ``allowed_directories`` = the store's ``data/`` folder so the
   views can still read), no extension auto-install/auto-load, no Python replacement scans, and
   ``lock_configuration=true`` so the query cannot undo any of it.
3. **Writes never go through SQL.** The session is an in-memory database; the store's files are only
   written by :class:`~interplab.store.writer.RunWriter`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from duckdb import func, sqltypes

from interplab.store import codec, layout, reuse, runfilter
from interplab.store.errors import StoreError
from interplab.store.fs import Location
from interplab.store.manifest import FileEntry, RunInfo
from interplab.store.views import ViewFile, view_files

ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
# With at least this many committed activation files, a query that reads only some runs'
# activations (interplab.store.runfilter) runs on views over those runs' files alone.
NARROW_MIN_FILES = 256
_NARROW_CACHE = 4  # such narrowed sessions kept per session
BASE_VIEWS = ("runs", "prompts", "activations")  # always present, typed; a kind's views exist once it wrote rows
_ACT_COLUMNS = "run_id, prompt_id, position, token_id, token, site, layer, head"

_EMPTY = {
    "prompts": "NULL::VARCHAR AS run_id, NULL::BIGINT AS prompt_id, NULL::INTEGER AS n_tokens, "
    "NULL::INTEGER[] AS token_ids, NULL::VARCHAR[] AS tokens",
    "activations": "NULL::VARCHAR AS run_id, NULL::BIGINT AS prompt_id, NULL::INTEGER AS position, "
    "NULL::INTEGER AS token_id, NULL::VARCHAR AS token, NULL::VARCHAR AS site, NULL::INTEGER AS layer, "
    "NULL::INTEGER AS head, NULL::FLOAT[] AS act",
}


# -- 1. statement check --------------------------------------------------------------------------


def check_query(query: str, views: Iterable[str]) -> dict[str, Any]:
    """Raise :class:`StoreError` unless ``query`` is one read-only SELECT over the store's views;
    return its parse tree (DuckDB's ``json_serialize_sql``)."""
    if not isinstance(query, str) or not query.strip():
        raise StoreError("empty SQL query")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise StoreError(f"malformed SQL: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise StoreError(f"refused: exactly one SQL statement per query, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise StoreError(
            f"refused: only SELECT queries are allowed; {kind.name} statements cannot run "
            "(the store is read-only through SQL; write with interplab's writers)"
        )
    with duckdb.connect(config={"enable_external_access": False}) as con:
        row = con.execute("SELECT json_serialize_sql($q)", {"q": query}).fetchone()
    if row is None:  # json_serialize_sql returns one row
        raise StoreError("refused: query could not be checked (no parse tree)")
    (raw,) = row
    tree: dict[str, Any] = json.loads(raw)
    if tree.get("error"):
        raise StoreError(f"refused: query could not be checked ({tree.get('error_message')})")
    allowed = {v.lower() for v in views}
    ctes: set[str] = set()
    refs: list[dict[str, Any]] = []
    _walk(tree["statements"], ctes, refs)
    for ref in refs:
        _check_ref(ref, allowed | ctes, sorted(allowed))
    return tree


def _walk(node: Any, ctes: set[str], refs: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        if node.get("type") in ("BASE_TABLE", "TABLE_FUNCTION", "SHOW_REF"):
            refs.append(node)
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes.update(str(item.get("key", "")).lower() for item in cte_map.get("map", []))
        for value in node.values():
            _walk(value, ctes, refs)
    elif isinstance(node, list):
        for item in node:
            _walk(item, ctes, refs)


def _check_ref(ref: dict[str, Any], allowed: set[str], views: list[str]) -> None:
    if ref["type"] == "TABLE_FUNCTION":
        name = str(ref.get("function", {}).get("function_name", "")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            raise StoreError(
                f"refused: table function {name}() is not allowed (no file access through SQL); "
                f"query the store's views instead: {', '.join(views)}"
            )
        return
    if ref["type"] == "SHOW_REF":
        if ref.get("table_name"):
            raise StoreError(f"refused: SHOW is not allowed; the store's views are: {', '.join(views)}")
        return
    name = str(ref.get("table_name", ""))
    schema = str(ref.get("schema_name", "")).lower()
    catalog = str(ref.get("catalog_name", "")).lower()
    if catalog not in ("", "memory") or schema not in ("", "main") or name.lower() not in allowed:
        what = "a file path" if ("/" in name or "." in name) else "an unknown table"
        raise StoreError(f"refused: {name!r} is {what}; queries may only read the store's views: {', '.join(views)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- 2. session and views -----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One store of a catalog session: its location, its runs, and the ``store``/``team`` values
    its rows get in every view."""

    loc: Location
    runs: list[RunInfo]
    name: str
    team: str | None


class Session:
    """A locked DuckDB connection whose views cover exactly the given committed runs.

    With ``sources`` (a catalog) each store's views are built in a schema of their own and every
    public view is their ``UNION ALL BY NAME``, with ``store`` and ``team`` columns added (the
    ``runs`` view has them already); the sandbox allows exactly the stores' ``data/`` folders.
    """

    def __init__(
        self,
        loc: Location | None,
        runs: list[RunInfo],
        *,
        sources: Sequence[Source] | None = None,
        only_runs: frozenset[str] | None = None,
        view_defs: dict[str, ViewFile] | None = None,
    ):
        """``only_runs``: only the ``runs`` and activation views, these holding only rows of these
        runs (same columns and types); the session :meth:`execute` uses for a query that reads no
        other rows. ``view_defs``: the view files, when already found."""
        self._loc = loc
        self._runs = runs
        self._only_runs = only_runs
        self._narrowed: dict[frozenset[str], Session] = {}
        self._n_activation_files = 0
        self._con = duckdb.connect(
            config={
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "allow_community_extensions": False,
                "python_enable_replacements": False,
            }
        )
        self._keep: list[Any] = []  # Arrow objects registered with DuckDB must outlive the views
        self._files: dict[str, ViewFile] = view_defs or {}
        self.views: list[str] = []
        self._runs_name = "_interplab_runs"
        self._mixed_widths = False
        self._udfs: set[str] = set()
        try:
            if sources is None:
                if loc is None:
                    raise StoreError("a session needs a store location or catalog sources")
                self._create_views(loc, runs)
                locations = [loc]
            else:
                self._create_catalog_views(sources)
                locations = [source.loc for source in sources]
            allowed = [place.path("data") + "/" for place in locations if place.local]
            self._con.execute(f"SET allowed_directories = {_sql_list(allowed)}")
            self._con.execute("SET enable_external_access = false")
            self._con.execute("SET lock_configuration = true")
        except BaseException:
            self.close()
            raise

    def execute(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        con = self._connection_for(check_query(query, self.views), params)
        try:
            return con.sql(query, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {_first_line(exc)}") from None

    def explain(self, query: str, params: dict[str, Any] | None = None) -> str:
        """Run ``query`` (checked as :meth:`execute` checks it) under ``EXPLAIN ANALYZE`` and return
        DuckDB's profile: its time per operator and, for each Parquet scan, the files it read."""
        con = self._connection_for(check_query(query, self.views), params)
        try:
            rows = con.sql("EXPLAIN ANALYZE " + query, params=params or None).fetchall()
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {_first_line(exc)}") from None
        return "\n".join(str(row[-1]) for row in rows)

    def _connection_for(self, tree: dict[str, Any], params: dict[str, Any] | None) -> duckdb.DuckDBPyConnection:
        """This session's connection, or, for a query that reads the activations of only some runs
        of a large local store, a session's whose activation views list only those runs' files
        (DuckDB binds a view's whole file list at every query)."""
        if self._loc is None or not self._loc.local or self._only_runs is not None:
            return self._con
        if self._n_activation_files < NARROW_MIN_FILES:
            return self._con
        runs = runfilter.runs_read(tree, params)
        if runs is None:
            return self._con
        session = self._narrowed.pop(runs, None)
        if session is None:
            session = Session(self._loc, self._runs, only_runs=runs, view_defs=self._files)
            if len(self._narrowed) >= _NARROW_CACHE:
                self._narrowed.pop(next(iter(self._narrowed))).close()
        self._narrowed[runs] = session  # most recently used last
        return session._con

    def close(self) -> None:
        for session in self._narrowed.values():
            session.close()
        self._narrowed.clear()
        self._con.close()
        self._keep.clear()

    # views ------------------------------------------------------------------------------------

    def _create_views(self, loc: Location, runs: list[RunInfo]) -> None:
        self._files = self._files or view_files()
        committed = [r for r in runs if r.status == "committed"]
        by_table: dict[str, list[FileEntry]] = defaultdict(list)
        for run in committed:
            for entry in run.files:
                by_table[entry.table].append(entry)
        self._register(self._runs_name, _runs_table(runs))
        self._view("runs", self._runs_name)
        activations = by_table.pop(layout.ACTIVATIONS, [])
        reusing = [r for r in committed if reuse.referenced(r)]
        self._n_activation_files += len(activations)
        all_widths = list(dict.fromkeys(d for _, d in sorted({(e.dtype or "float16", int(e.d or 0)) for e in activations})))
        only = self._only_runs
        if only is not None:  # rows of other runs: their run_id (partition, or the reusing run) is not in only
            activations = [e for e in activations if e.source_run is not None or _partition_run(e) in only]
            reusing = [r for r in reusing if r.run_id in only]
        widths = self._activation_views(loc, activations, reusing, all_widths)
        if only is not None:  # the query reads no other view (interplab.store.runfilter)
            by_table.clear()
            by_table["prompts"] = []
        self._view("prompts", self._table_relation(loc, "prompts", by_table.pop("prompts", [])))
        for table, entries in sorted(by_table.items()):
            if table not in self.views:  # typed where a view file defines it (interplab.store.views), else every column
                self._view(table, self._table_relation(loc, table, entries))
        for d, relation in widths.items():
            self._con.execute(f"CREATE VIEW activations_d{d} AS SELECT {_ACT_COLUMNS}, act FROM {relation}")
            self.views.append(f"activations_d{d}")

    def _create_catalog_views(self, sources: Sequence[Source]) -> None:
        """Each store's views in schema ``s<i>``; the public views union them (see the class doc)."""
        if not sources:
            raise StoreError("the catalog lists no stores")
        widths = {
            int(e.d or 0)
            for source in sources
            for run in source.runs
            if run.status == "committed"
            for e in run.files
            if e.table == layout.ACTIVATIONS
        }
        self._mixed_widths = len(widths) > 1
        per_store: list[list[str]] = []
        for i, source in enumerate(sources):
            self._con.execute(f"CREATE SCHEMA s{i}")
            self._con.execute(f"USE memory.s{i}")
            self.views = []
            self._runs_name = f"_interplab_runs_{i}"
            self._create_views(source.loc, source.runs)
            per_store.append(list(self.views))
        self._con.execute("USE memory.main")
        order = list(dict.fromkeys(name for names in per_store for name in names))
        self.views = []
        for name in order:
            parts = []
            for i, (source, names) in enumerate(zip(sources, per_store)):
                if name not in names:
                    continue
                columns = set(self._con.sql(f"SELECT * FROM s{i}.{name} LIMIT 0").columns)
                extra = "".join(
                    f", {_sql_str(value)}::VARCHAR AS {col}"
                    for col, value in (("store", source.name), ("team", source.team))
                    if col not in columns
                )
                parts.append(f"SELECT *{extra} FROM s{i}.{name}")
            self._con.execute(f"CREATE VIEW main.{name} AS " + " UNION ALL BY NAME ".join(parts))
            self.views.append(name)

    def _view(self, name: str, relation: str) -> None:
        file = self._files.get(name)
        generic = file is None
        if file is None and name in BASE_VIEWS:
            raise StoreError(f"the core view file {name}.sql is missing from the installed package")
        if file is not None:
            try:
                self._con.execute(file.sql().replace("{{" + name + "}}", relation))
            except duckdb.BinderException:
                if name in BASE_VIEWS:
                    raise
                # files written before the view's columns were settled: show every column rather than none
                generic = True
            except duckdb.Error as exc:
                raise StoreError(f"view {name!r} from {file.path} ({file.owner}) does not run: {_first_line(exc)}") from None
        if generic:
            self._con.execute(f"CREATE VIEW {name} AS SELECT * FROM {relation}")
        self.views.append(name)

    def _activation_views(
        self, loc: Location, entries: list[FileEntry], reusing: Sequence[RunInfo] = (), all_widths: Iterable[int] = ()
    ) -> dict[int, str]:
        """Create the ``activations`` view; return one relation per vector width for ``activations_dN``
        (an empty one, of the same type, for each of ``all_widths`` that ``entries`` lack).

        Files a run references (``source_run``, see :mod:`interplab.store.reuse`) are read once per
        referencing run, joined to its ``reused_rows``, under its own run and prompt ids."""
        groups: dict[tuple[str, int], list[FileEntry]] = defaultdict(list)
        for entry in entries:
            if entry.source_run is None:
                groups[(entry.dtype or "float16", int(entry.d or 0))].append(entry)
        referenced: dict[tuple[str, int], list[tuple[RunInfo, list[FileEntry]]]] = defaultdict(list)
        for run in reusing:
            by_width: dict[tuple[str, int], list[FileEntry]] = defaultdict(list)
            for entry in reuse.referenced(run):
                by_width[(entry.dtype or "float16", int(entry.d or 0))].append(entry)
            for group, files in by_width.items():
                referenced[group].append((run, files))
        hive = {"run_id": "VARCHAR", "site": "VARCHAR", "layer": "INTEGER"}
        per_width: dict[int, list[str]] = defaultdict(list)
        for dtype, d in sorted(set(groups) | set(referenced)):
            name = codec.udf_name(dtype, d)
            if name not in self._udfs:  # a catalog's stores share the connection's functions
                self._udfs.add(name)
                self._con.create_function(
                    name,
                    codec.duckdb_decoder(dtype, d),
                    [sqltypes.BLOB],
                    duckdb.array_type(sqltypes.FLOAT, d),
                    type=func.PythonUDFType.ARROW,
                )
            if groups.get((dtype, d)):
                source = self._source(loc, layout.ACTIVATIONS, groups[(dtype, d)], hive)
                per_width[d].append(f"SELECT {_ACT_COLUMNS}, {name}(act) AS act FROM {source}")
            for run, files in referenced.get((dtype, d), []):
                mapping = self._table_relation(loc, reuse.REUSED_ROWS, [e for e in run.files if e.table == reuse.REUSED_ROWS])
                source = self._source(loc, layout.ACTIVATIONS, files, hive)
                per_width[d].append(
                    reuse.referenced_select(run.run_id, source, mapping, f"{name}(a.act)", _ACT_COLUMNS.split(", "))
                )
        for d in all_widths:
            if d not in per_width:
                per_width[d].append(f"SELECT {_EMPTY['activations'].replace('FLOAT[]', f'FLOAT[{d}]')} WHERE false")
        order = list(dict.fromkeys([*all_widths, *per_width]))
        widths = {d: "(" + " UNION ALL ".join(per_width[d]) + ")" for d in order}
        if not widths:
            relation = f"(SELECT {_EMPTY['activations']} WHERE false)"
        elif len(widths) == 1 and not self._mixed_widths:
            relation = next(iter(widths.values()))
        else:  # one column cannot hold FLOAT[576] and FLOAT[64]: fall back to a list, see docs/store.md
            relation = (
                "("
                + " UNION ALL ".join(f"SELECT {_ACT_COLUMNS}, act::FLOAT[] AS act FROM {rel}" for rel in widths.values())
                + ")"
            )
        self._view("activations", relation)
        return widths

    def _table_relation(self, loc: Location, table: str, entries: list[FileEntry]) -> str:
        if not entries:
            if table in _EMPTY:
                return f"(SELECT {_EMPTY[table]} WHERE false)"
            return "(SELECT NULL::VARCHAR AS run_id WHERE false)"
        return "(SELECT * FROM " + self._source(loc, table, entries, {"run_id": "VARCHAR"}) + ")"

    def _source(self, loc: Location, table: str, entries: list[FileEntry], hive: dict[str, str]) -> str:
        """A FROM-able relation over ``entries``: DuckDB's Parquet reader locally, a pyarrow dataset on S3.

        Locally, when the manifests say every file has the same columns (:func:`one_schema`), DuckDB
        takes the first file's schema for all of them; a query that filters the partition columns
        (run_id, site, layer) then opens only the files it selects. Otherwise ``union_by_name``
        reconciles the schemas, which reads every file's footer each time a query uses the view."""
        if loc.local:
            files = _sql_list(loc.path(e.path) for e in entries)
            types = "{" + ", ".join(f"'{k}': {v}" for k, v in hive.items()) + "}"
            union = "false" if one_schema(entries) else "true"
            return f"read_parquet({files}, hive_partitioning = true, hive_types = {types}, union_by_name = {union})"
        arrow_types = {"VARCHAR": pa.string(), "INTEGER": pa.int32()}
        partitioning = ds.HivePartitioning(
            pa.schema([(k, arrow_types[v]) for k, v in hive.items()]), null_fallback=layout.NULL_PARTITION
        )
        dataset = ds.dataset(
            [loc.path(e.path) for e in entries],
            filesystem=loc.fs,
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=loc.path("data", table),
        )
        name = f"_interplab_ds_{len(self._keep)}"
        self._register(name, dataset)
        return name

    def _register(self, name: str, obj: Any) -> None:
        self._keep.append(obj)
        self._con.register(name, obj)


def _partition_run(entry: FileEntry) -> str | None:
    """The ``run_id=`` folder of a data file: the run_id its rows have in the views."""
    return layout.parse_partitions(entry.path).get("run_id")


def one_schema(entries: Sequence[FileEntry]) -> bool:
    """Whether the manifests record one and the same column schema for every file of ``entries``."""
    hashes = {e.schema_hash for e in entries}
    return len(hashes) == 1 and None not in hashes


def _runs_table(runs: list[RunInfo]) -> pa.Table:
    def js(value: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True, default=str)

    ts = pa.timestamp("us", tz="UTC")
    rows = [r for r in sorted(runs, key=lambda r: r.created_at)]
    columns = {
        "run_id": pa.array([r.run_id for r in rows], pa.string()),
        "kind": pa.array([r.kind for r in rows], pa.string()),
        "status": pa.array([r.status for r in rows], pa.string()),
        "model": pa.array([r.model for r in rows], pa.string()),
        "weight_hash": pa.array([r.weight_hash for r in rows], pa.string()),
        "created_at": pa.array([r.created_at or None for r in rows], pa.string()).cast(ts),
        "committed_at": pa.array([r.committed_at for r in rows], pa.string()).cast(ts),
        "failed_at": pa.array([r.failed_at for r in rows], pa.string()).cast(ts),
        "error": pa.array([r.error for r in rows], pa.string()),
        "user": pa.array([r.user for r in rows], pa.string()),
        "host": pa.array([r.host for r in rows], pa.string()),
        "package_version": pa.array([r.package_version for r in rows], pa.string()),
        "spec": pa.array([js(r.spec) for r in rows], pa.string()),
        "provenance": pa.array([js(r.provenance) for r in rows], pa.string()),
        "metadata": pa.array([js(r.metadata) for r in rows], pa.string()),
        "n_files": pa.array([len(r.files) for r in rows], pa.int64()),
        "n_activation_rows": pa.array([r.rows.get(layout.ACTIVATIONS, 0) for r in rows], pa.int64()),
        "owner": pa.array([r.owner for r in rows], pa.string()),
        "team": pa.array([r.team for r in rows], pa.string()),
        "git_commit": pa.array([r.git_commit for r in rows], pa.string()),
        "git_dirty": pa.array([r.git_dirty for r in rows], pa.bool_()),
        "spec_hash": pa.array([r.spec_hash for r in rows], pa.string()),
        "dataset_hash": pa.array([r.dataset_hash for r in rows], pa.string()),
        "inputs": pa.array([list(r.inputs) for r in rows], pa.list_(pa.string())),
        "timings": pa.array([js(r.timings) for r in rows], pa.string()),
        "wall_s": pa.array([r.timings.get("wall_s") for r in rows], pa.float64()),
        "tags": pa.array([list(r.tags) for r in rows], pa.list_(pa.string())),
        "description": pa.array([r.description for r in rows], pa.string()),
        "pinned": pa.array([r.pinned for r in rows], pa.bool_()),
        "n_bytes": pa.array([r.n_bytes for r in rows], pa.int64()),
        "store": pa.array([r.store for r in rows], pa.string()),
    }
    return pa.table(columns)


def _sql_str(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _sql_list(items: Iterable[str]) -> str:
    return "[" + ", ".join("'" + str(item).replace("'", "''") + "'" for item in items) + "]"
