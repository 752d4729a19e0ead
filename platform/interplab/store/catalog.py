"""Several stores read as one: the catalog file, SQL across stores, usage and retention.

The catalog (``~/.config/interplab/stores.toml``, or ``$INTERPLAB_CATALOG``) names the stores a
person reads::

    [stores.lab]                      # a lab root: its team areas (teams/<team>/) come with it
    uri = "/shared/interp-lab"
    [stores.probing]
    uri = "s3://interp/probing"
    team = "probing"                  # the team column of this store's rows (default: its area's)
    [stores.archive]
    uri = "/archive/interp"
    areas = false                     # this store only, not its team areas

``open_catalog()`` opens every store once (two entries for the same location are one store) and
shows every run once (a run id found in two stores is read from the first, in catalog order).
``Catalog.sql`` runs one read-only SELECT over all of them: the views are the union of each store's
views with ``store`` and ``team`` columns, inside the same sandbox as one store's
(:mod:`interplab.store.query`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from interplab.store import layout
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo
from interplab.store.store import Store, open_store

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

if TYPE_CHECKING:
    import pyarrow as pa

    from interplab.store.query import Session

CATALOG_ENV = "INTERPLAB_CATALOG"
_ENTRY_KEYS = {"uri", "team", "areas"}


def catalog_path() -> str:
    """``$INTERPLAB_CATALOG``, else ``$XDG_CONFIG_HOME/interplab/stores.toml`` (``~/.config/…``)."""
    if os.environ.get(CATALOG_ENV):
        return os.path.expanduser(os.environ[CATALOG_ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "interplab", "stores.toml")


@dataclass(frozen=True)
class CatalogEntry:
    """One ``[stores.<name>]`` table of the catalog file."""

    name: str
    uri: str
    team: str | None = None
    areas: bool = True


def read_catalog(path: str | None = None) -> list[CatalogEntry]:
    """The entries of the catalog file at ``path`` (default :func:`catalog_path`), in file order."""
    path = path or catalog_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise StoreError(
            f"no store catalog at {path}; create it with [stores.<name>] tables (uri = ...), set ${CATALOG_ENV}, or pass --store"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise StoreError(f"store catalog {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"stores"})
    if unknown:
        raise StoreError(f"store catalog {path}: unknown top-level key {unknown[0]!r}; stores are [stores.<name>] tables")
    stores = data.get("stores", {})
    if not isinstance(stores, dict) or not stores:
        raise StoreError(f"store catalog {path} lists no stores; add a [stores.<name>] table with uri = ...")
    out = []
    for name, table in stores.items():
        where = f"store catalog {path}: [stores.{name}]"
        if not isinstance(table, dict):
            raise StoreError(f"{where} must be a table with uri = ...")
        extra = sorted(set(table) - _ENTRY_KEYS)
        if extra:
            raise StoreError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(_ENTRY_KEYS))}")
        uri, team, areas = table.get("uri"), table.get("team"), table.get("areas", True)
        if not isinstance(uri, str) or not uri:
            raise StoreError(f"{where}: uri must be a directory or s3://bucket/prefix, got {uri!r}")
        if team is not None and (not isinstance(team, str) or not team):
            raise StoreError(f"{where}: team must be a non-empty string, got {team!r}")
        if not isinstance(areas, bool):
            raise StoreError(f"{where}: areas must be true or false, got {areas!r}")
        out.append(CatalogEntry(name, uri, team, areas))
    return out


@dataclass(frozen=True)
class CatalogStore:
    """One opened store of a catalog: its name (the ``store`` column) and team (the ``team`` column)."""

    name: str
    team: str | None
    store: Store


class Catalog:
    """Several stores read as one (see the module doc). Cheap to create; all state lives in the files."""

    def __init__(self, stores: Sequence[CatalogStore], *, single: bool = False):
        if not stores:
            raise StoreError("a catalog needs at least one store")
        self.stores: list[CatalogStore] = list(stores)
        self.single = single  # one store named by --store / $INTERPLAB_STORE: SQL as that store's own
        self.duplicates: list[tuple[str, str]] = []  # (run_id, store) read from an earlier store instead
        self._session: Session | None = None
        self._session_key: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"Catalog({[s.name for s in self.stores]!r})"

    # -- runs ----------------------------------------------------------------------------------

    def runs(self, status: str | None = None) -> list[RunInfo]:
        """Every run of every store, each once, oldest first; ``store`` is its catalog name and
        ``team`` its recorded team, else the store's."""
        return sorted(
            (r for rs in self._runs_by_store().values() for r in rs if status is None or r.status == status),
            key=lambda r: (r.created_at, r.run_id),
        )

    def _runs_by_store(self) -> dict[str, list[RunInfo]]:
        seen: set[str] = set()
        self.duplicates = []
        out: dict[str, list[RunInfo]] = {}
        for entry in self.stores:
            kept = []
            for run in entry.store.runs():
                if run.run_id in seen:
                    self.duplicates.append((run.run_id, entry.name))
                    continue
                seen.add(run.run_id)
                kept.append(dataclasses.replace(run, store=entry.name, team=run.team or entry.team))
            out[entry.name] = kept
        return out

    def find(self, run_id: str) -> tuple[CatalogStore, RunInfo]:
        """The store holding ``run_id`` (the first, in catalog order) and the run."""
        layout.check_run_id(run_id)
        for entry in self.stores:
            try:
                run = entry.store.run(run_id)
            except StoreError:
                continue
            return entry, dataclasses.replace(run, store=entry.name, team=run.team or entry.team)
        names = ", ".join(s.name for s in self.stores)
        raise StoreError(f"unknown run id {run_id!r} in {'store' if len(self.stores) == 1 else 'stores'} {names}")

    def run(self, run_id: str) -> RunInfo:
        return self.find(run_id)[1]

    # -- SQL -----------------------------------------------------------------------------------

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        """One read-only SELECT over every store's committed data (views gain ``store`` and ``team``)."""
        if self.single:
            return self.stores[0].store.sql(query, params)
        return self._current_session().execute(query, params)

    def views(self) -> list[str]:
        if self.single:
            return self.stores[0].store.views()
        return list(self._current_session().views)

    def _current_session(self) -> Session:
        by_store = self._runs_by_store()
        key = tuple((name, r.run_id, r.status, r.committed_at) for name, rs in by_store.items() for r in rs)
        if self._session is None or key != self._session_key:
            from interplab.store.query import Session, Source  # DuckDB only for SQL

            self.close()
            sources = [Source(e.store.location, by_store[e.name], e.name, e.team) for e in self.stores]
            self._session = Session(None, [], sources=sources)
            self._session_key = key
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        for entry in self.stores:
            entry.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_catalog(path: str | None = None, *, stores: Sequence[str] | None = None) -> Catalog:
    """The catalog at ``path`` (default :func:`catalog_path`), or of the store URIs ``stores``
    (each exactly that store, named by its URI). Lab roots in a catalog file bring their team areas."""
    if stores:
        return Catalog(_dedupe(CatalogStore(s.uri, s.team, s) for s in (open_store(u, create=False) for u in stores)))
    opened: list[CatalogStore] = []
    for entry in read_catalog(path):
        try:
            store = open_store(entry.uri, create=False)
        except StoreError as exc:
            raise StoreError(f"catalog entry {entry.name!r}: {exc}") from None
        opened.append(CatalogStore(entry.name, entry.team or store.team, store))
        if entry.areas:
            for team, uri in store.team_areas().items():
                opened.append(CatalogStore(f"{entry.name}/{team}", team, open_store(uri, create=False)))
    return Catalog(_dedupe(opened))


def open_for_cli(store_uris: Sequence[str], catalog: str | None) -> Catalog:
    """What a CLI command reads: ``--store`` URIs (repeatable), else ``--catalog FILE``, else
    ``$INTERPLAB_STORE``, else the catalog file when there is one, else ``./interplab-store``."""
    from interplab.store.fs import STORE_ENV

    if store_uris and catalog:
        raise StoreError("give --store URI(s) or --catalog FILE, not both")
    if store_uris:
        cat = open_catalog(stores=list(store_uris))
        cat.single = len(store_uris) == 1
        return cat
    if catalog:
        return open_catalog(catalog)
    if not os.environ.get(STORE_ENV) and (os.environ.get(CATALOG_ENV) or os.path.exists(catalog_path())):
        return open_catalog()
    cat = open_catalog(stores=[os.environ.get(STORE_ENV) or ""])
    cat.single = True
    return cat


def _dedupe(stores: Iterable[CatalogStore]) -> list[CatalogStore]:
    """Drop a store already listed (same resolved location, e.g. a team area named twice)."""
    out: list[CatalogStore] = []
    seen: set[str] = set()
    for entry in stores:
        loc = entry.store.location
        key = os.path.realpath(loc.root) if loc.local else loc.uri
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


# -- usage and retention -----------------------------------------------------------------------

USAGE_DIMENSIONS = ("team", "owner", "kind")
_ORIGIN_FIELDS = ("origin_run", "origin_run_id", "source_run", "run_id")


def file_origin(entry: FileEntry, run_id: str) -> str:
    """The run whose data a manifest entry is: a field naming it when the entry has one, else the
    ``run_id=`` partition of its path, else the run listing it."""
    for name in _ORIGIN_FIELDS:
        value = getattr(entry, name, None)
        if isinstance(value, str) and value:
            return value
    return layout.parse_partitions(entry.path).get("run_id") or run_id


def usage(runs: Sequence[RunInfo], by: Sequence[str] = USAGE_DIMENSIONS) -> list[dict[str, Any]]:
    """Bytes of committed data per team, owner and kind, from the commit manifests.

    Each file is counted once, for the run whose data it is (a run that references another run's
    files adds nothing). Rows: ``{by, key, runs, files, bytes}``, largest first within each ``by``."""
    for dim in by:
        if dim not in USAGE_DIMENSIONS:
            raise StoreError(f"usage by {dim!r}: one of {', '.join(USAGE_DIMENSIONS)}")
    committed = {(r.store, r.run_id): r for r in runs if r.status == "committed"}
    counted: set[tuple[str | None, str]] = set()
    per_run_files: dict[tuple[str | None, str], int] = defaultdict(int)
    per_run_bytes: dict[tuple[str | None, str], int] = defaultdict(int)
    for (store, run_id), run in committed.items():
        for entry in run.files:
            if (store, entry.path) in counted:
                continue
            counted.add((store, entry.path))
            origin = file_origin(entry, run_id)
            owner_key = (store, origin) if (store, origin) in committed else (store, run_id)
            per_run_files[owner_key] += 1
            per_run_bytes[owner_key] += entry.bytes
    out: list[dict[str, Any]] = []
    for dim in by:
        groups: dict[str | None, dict[str, int]] = defaultdict(lambda: {"runs": 0, "files": 0, "bytes": 0})
        for key, run in committed.items():
            group = groups[getattr(run, dim)]
            group["runs"] += 1
            group["files"] += per_run_files.get(key, 0)
            group["bytes"] += per_run_bytes.get(key, 0)
        rows = [{"by": dim, "key": k, **v} for k, v in groups.items()]
        out += sorted(rows, key=lambda r: (-r["bytes"], str(r["key"])))
    return out


@dataclass(frozen=True)
class GcDecision:
    """A run ``runs gc`` selected: deleted unless ``kept`` names why not."""

    run: RunInfo
    kept: str | None = None


def gc_plan(
    runs: Sequence[RunInfo],
    *,
    older_than_days: float | None = None,
    kinds: Sequence[str] = (),
    failed: bool = False,
    now: datetime | None = None,
) -> list[GcDecision]:
    """The runs a retention sweep selects (every given filter must hold: created more than
    ``older_than_days`` ago, of one of ``kinds``, ``failed`` only) and, for each, whether it is kept:
    runs still running, pinned runs, and runs another run reuses (named in its ``inputs``, or whose
    files its commit manifest lists) are never deleted. ``runs`` should be every run that could
    reference the selection (a whole catalog)."""
    if older_than_days is None and not kinds and not failed:
        raise StoreError("select what to delete: --older-than DAYS, --kind KIND and/or --failed")
    if older_than_days is not None and older_than_days < 0:
        raise StoreError(f"--older-than must be a number of days >= 0, got {older_than_days}")
    now = now or datetime.now(timezone.utc)
    used_by = {run_id: uses[0] for run_id, uses in reuses(runs).items()}
    out = []
    for run in runs:
        if kinds and run.kind not in kinds:
            continue
        if failed and run.status != "failed":
            continue
        if older_than_days is not None:
            created = _parse_time(run.created_at)
            if created is None or now - created <= timedelta(days=older_than_days):
                continue
        kept = None
        if run.status == "running":
            kept = "still running"
        elif run.pinned:
            kept = "pinned"
        elif run.run_id in used_by:
            kept = used_by[run.run_id]
        out.append(GcDecision(run, kept))
    return out


PART_OF = "part_of"  # provenance key: the run this run was made for (kept while that run is)


def reuses(runs: Sequence[RunInfo]) -> dict[str, list[str]]:
    """For each run another run depends on, how, in ``runs`` order: ``an input of R`` (R, committed or
    running, names it in its ``inputs``), ``its files are used by R`` (R's commit manifest lists
    them) or ``part of R`` (its provenance's ``part_of`` names R, committed or running: a run a job
    makes for another, e.g. a partition's own capture). Deleting such a run would take data from R."""
    used_by: dict[str, list[str]] = defaultdict(list)
    live = {run.run_id for run in runs if run.status in ("running", "committed")}
    for run in runs:
        parent = run.provenance.get(PART_OF)
        if isinstance(parent, str) and parent in live and parent != run.run_id:
            used_by[run.run_id].append(f"part of {parent}")
        uses: dict[str, str] = {}
        if run.status == "running" or run.status == "committed":
            for source in run.inputs:
                uses.setdefault(source, f"an input of {run.run_id}")
        if run.status == "committed":
            for entry in run.files:
                origin = file_origin(entry, run.run_id)
                if origin != run.run_id:
                    uses.setdefault(origin, f"its files are used by {run.run_id}")
        for source, how in uses.items():
            used_by[source].append(how)
    return dict(used_by)


def deletion_refused(run: RunInfo, runs: Sequence[RunInfo]) -> str | None:
    """Why ``run`` must not be deleted (pinned, or other runs of ``runs`` depend on it), or None."""
    reasons = []
    if run.pinned:
        reasons.append("it is pinned")
    for how in reuses(runs).get(run.run_id, []):
        reasons.append(how if how.startswith("its ") else f"it is {how}")
    return "; ".join(reasons) or None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
