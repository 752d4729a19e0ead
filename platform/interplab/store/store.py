"""The activation store: open it, begin runs, list them, query committed data with safe SQL, export."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, overload

from interplab.store import fs, layout
from interplab.store import provenance as pv
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry, RunInfo, build_info, dumps, loads, now_iso
from interplab.store.provenance import GitState
from interplab.store.sqlfiles import saved_query

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

    from interplab.store.query import Session
    from interplab.store.writer import RunWriter

# Opening a store and listing its runs import neither numpy nor pyarrow (``interplab runs`` stays
# light): the writer, the codec and the reuse reader are imported where they are used.

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def open_store(uri: str | None = None, *, create: bool = True, team: str | None = None) -> Store:
    """Open the store at ``uri`` (a directory or ``s3://bucket/prefix``; None → ``$INTERPLAB_STORE`` →
    ``./interplab-store``). With ``create`` a missing or empty location becomes a new store (``team``
    is then recorded in its marker: a team area); without it, anything that is not already a store
    raises :class:`StoreError`.
    """
    loc = fs.resolve(uri)
    marker = loc.path(layout.MARKER)
    if loc.local and os.path.exists(loc.root) and not os.path.isdir(loc.root):
        raise StoreError(f"{loc.uri} is a file, not an interplab store")
    raw = fs.read_bytes(loc, marker)
    if raw is None:
        empty = not fs.list_files(loc, loc.root)
        if not create:
            what = "no interplab store" if empty else "not an interplab store (no interplab-store.json)"
            raise StoreError(f"{loc.uri}: {what}")
        if not empty:
            raise StoreError(f"{loc.uri} is not empty and not an interplab store; refusing to create one there")
        record = {"format": layout.FORMAT_NAME, "version": layout.FORMAT_VERSION, "created_at": now_iso()}
        if team:
            record["team"] = team
        fs.create_exclusive(loc, marker, dumps(record))
    else:
        record = loads(raw, marker)
        if record.get("format") != layout.FORMAT_NAME or record.get("version") != layout.FORMAT_VERSION:
            raise StoreError(f"{loc.uri}: unsupported store format {record.get('format')!r} v{record.get('version')}")
    return Store(loc, record)


class Store:
    """One store. Cheap to create; all state lives in the files."""

    def __init__(self, location: fs.Location, marker: dict[str, Any] | None = None):
        self.location = location
        self.marker: dict[str, Any] = marker or {}
        self._team: tuple[str | None] | None = None
        self._last_event_at: str | None = None
        self._records: dict[str, dict[str, Any]] = {}  # immutable run.json / commit.json, by path
        self._session: Session | None = None
        self._session_key: tuple[tuple[str, str, str | None], ...] | None = None  # (run_id, status, committed_at)

    @property
    def uri(self) -> str:
        return self.location.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def team(self) -> str | None:
        """The team this store is the area of (``<lab-root>/teams/<team>/`` or its marker's
        ``team``); None for a lab root or a plain store."""
        if self._team is None:
            parts = self.location.root.rstrip("/").split("/")
            parent = "/".join(parts[:-2])
            below_store = len(parts) >= 3 and bool(parent) and fs.exists(self.location, f"{parent}/{layout.MARKER}")
            self._team = (pv.area_team(self.location.root, self.marker, below_store),)
        return self._team[0]

    def team_areas(self) -> dict[str, str]:
        """``{team: uri}`` of the team areas below this store (``teams/<team>/`` with a store marker)."""
        loc = self.location
        out = {}
        for name in fs.list_dirs(loc, loc.path(pv.TEAMS_DIR)):
            if fs.exists(loc, loc.path(pv.TEAMS_DIR, name, layout.MARKER)):
                root = loc.path(pv.TEAMS_DIR, name)
                out[name] = root if loc.local else f"s3://{root}"
        return out

    # -- writing -------------------------------------------------------------------------------

    def begin_run(
        self,
        kind: str,
        *,
        model: str | None = None,
        spec: dict[str, Any] | None = None,
        weight_hash: str | None = None,
        run_id: str | None = None,
        provenance: dict[str, Any] | None = None,
        owner: str | None = None,
        team: str | None = None,
        inputs: list[str] | tuple[str, ...] | None = None,
        user: str | None = None,
        git: GitState | dict[str, Any] | None = None,
        dataset_hash: str | None = None,
    ) -> RunWriter:
        """Create a run (status ``running``) and return its writer. ``kind`` names what produced it
        (``capture``, ``patching``, ...); ``spec`` is the job spec, recorded as provenance.

        ``owner`` (``user`` is its older name) and ``team`` are resolved as
        :mod:`interplab.store.provenance` says when not given; ``inputs`` are the ids of the runs
        this one read; ``git`` the state of the spec's repository (:func:`provenance.git_state`);
        ``dataset_hash`` defaults to the hash a job kind recorded in ``provenance``."""
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise StoreError(f"invalid run kind {kind!r}: lower-case letters, digits and '_', e.g. 'capture'")
        if run_id is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            run_id = f"{kind}-{stamp}-{secrets.token_hex(4)}"
        layout.check_run_id(run_id)
        from interplab import __version__

        if owner and user and owner != user:
            raise StoreError(f"begin_run got owner={owner!r} and user={user!r}; give one (user is the older name of owner)")
        spec_record = _jsonable(spec, "spec")
        prov = _jsonable(provenance, "provenance") or {}
        resolved_owner = pv.resolve_owner(owner or user, prov)
        if isinstance(git, GitState):
            git = git.to_dict()
        record = {
            "run_id": run_id,
            "kind": kind,
            "model": model,
            "weight_hash": weight_hash,
            "spec": spec_record,
            "spec_hash": pv.spec_hash(spec_record),
            "dataset_hash": dataset_hash or pv.dataset_hash_from(prov),
            "package_version": __version__,
            "owner": resolved_owner,
            "user": resolved_owner,  # the pre-owner name, kept for older readers
            "team": pv.resolve_team(team, self.team),
            "inputs": pv.check_inputs(inputs),
            "git": _jsonable(git, "git"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created_at": now_iso(),
            "provenance": prov,
        }
        path = self.location.path(layout.run_dir(run_id), layout.RUN_FILE)
        if not fs.create_exclusive(self.location, path, dumps(record)):
            raise StoreError(f"run {run_id!r} already exists; use resume_run({run_id!r}) to add chunks to it")
        from interplab.store.writer import RunWriter

        return RunWriter(self, run_id)

    def resume_run(self, run_id: str) -> RunWriter:
        """A writer for an existing ``running`` or ``failed`` run (a failed run becomes ``running``).

        Use :meth:`RunWriter.written_chunks` to skip chunks already written.
        """
        info = self.run(run_id)
        if info.status == "committed":
            raise StoreError(f"run {run_id!r} is committed; committed runs are immutable")
        if info.status == "failed":
            fs.delete_file(self.location, self.location.path(layout.run_dir(run_id), layout.FAILED_FILE))
        from interplab.store.writer import RunWriter

        return RunWriter(self, run_id)

    # -- runs ----------------------------------------------------------------------------------

    def runs(self, status: str | None = None) -> list[RunInfo]:
        """All runs, oldest first (optionally only those with ``status``). One listing of ``runs/``;
        the immutable records (``run.json``, ``commit.json``, annotation events) are read once per
        :class:`Store` object, in parallel on S3."""
        loc = self.location
        files: dict[str, dict[str, Any]] = {}
        prefix_len = len(loc.path("runs")) + 1
        for listed in fs.list_files(loc, loc.path("runs")):
            parts = listed.path[prefix_len:].split("/")
            if len(parts) == 2:
                files.setdefault(parts[0], {})[parts[1]] = listed
            elif len(parts) == 3 and parts[1] == pv.ANNOTATIONS_DIR and _is_event(parts[2]):
                files.setdefault(parts[0], {}).setdefault(pv.ANNOTATIONS_DIR, []).append(parts[2])
        self._prefetch(files)
        out = []
        for run_id, present in files.items():
            info = self._load_run(run_id, present)
            if info is not None and (status is None or info.status == status):
                out.append(info)
        return sorted(out, key=lambda r: (r.created_at, r.run_id))

    def run(self, run_id: str) -> RunInfo:
        """One run's record; :class:`StoreError` if there is no such run."""
        layout.check_run_id(run_id)
        loc = self.location
        present: dict[str, Any] = {
            name: None
            for name in (layout.RUN_FILE, layout.FAILED_FILE, layout.COMMIT_FILE)
            if fs.exists(loc, loc.path(layout.run_dir(run_id), name))
        }
        present[pv.ANNOTATIONS_DIR] = [
            i.base_name
            for i in fs.list_files(loc, loc.path(layout.run_dir(run_id), pv.ANNOTATIONS_DIR))
            if _is_event(i.base_name)
        ]
        info = self._load_run(run_id, present)
        if info is None:
            raise StoreError(f"unknown run id {run_id!r} in store {self.uri}")
        return info

    def _load_run(self, run_id: str, present: dict[str, Any]) -> RunInfo | None:
        if layout.RUN_FILE not in present:
            return None
        base = self.location.path(layout.run_dir(run_id))
        record = self._immutable(f"{base}/{layout.RUN_FILE}")
        if record is None:
            return None
        commit = self._immutable(f"{base}/{layout.COMMIT_FILE}") if layout.COMMIT_FILE in present else None
        failed = None
        if layout.FAILED_FILE in present and commit is None:
            raw = fs.read_bytes(self.location, f"{base}/{layout.FAILED_FILE}")
            failed = loads(raw, "failed.json") if raw is not None else None
        events = []
        for name in present.get(pv.ANNOTATIONS_DIR) or ():
            event = self._immutable(f"{base}/{pv.ANNOTATIONS_DIR}/{name}")
            if event is not None:
                events.append((name, event))
        notes = pv.fold(events)
        return build_info(
            record,
            failed,
            commit,
            tags=notes.tags,
            description=notes.description,
            pinned=notes.pinned,
            store=self.uri,
            team=self.team,
        )

    def _immutable(self, path: str) -> dict[str, Any] | None:
        if path not in self._records:
            raw = fs.read_bytes(self.location, path)
            if raw is None:
                return None
            self._records[path] = loads(raw, path)
        return self._records[path]

    def _prefetch(self, files: dict[str, dict[str, Any]]) -> None:
        """Read the immutable records not cached yet with a few threads (S3: one request each)."""
        if self.location.local:
            return
        todo = []
        for run_id, present in files.items():
            base = self.location.path(layout.run_dir(run_id))
            names = [n for n in (layout.RUN_FILE, layout.COMMIT_FILE) if n in present]
            names += [f"{pv.ANNOTATIONS_DIR}/{n}" for n in present.get(pv.ANNOTATIONS_DIR) or ()]
            todo += [f"{base}/{n}" for n in names if f"{base}/{n}" not in self._records]
        if len(todo) < 8:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            for path, raw in zip(todo, pool.map(lambda p: fs.read_bytes(self.location, p), todo)):
                if raw is not None:
                    self._records[path] = loads(raw, path)

    # -- annotations ---------------------------------------------------------------------------

    def annotate(self, run_id: str, op: str, value: str | None = None, *, by: str | None = None) -> RunInfo:
        """Append one annotation event (``tag``/``untag`` TAG, ``describe`` TEXT, ``pin``, ``unpin``)
        to a run; returns the run as it reads now. Runs stay immutable: each event is its own file."""
        self.run(run_id)
        at = now_iso()
        if self._last_event_at is not None and at <= self._last_event_at:  # keep this writer's events in order
            at = (datetime.fromisoformat(self._last_event_at) + timedelta(microseconds=1)).isoformat(timespec="microseconds")
        self._last_event_at = at
        event = pv.annotation_event(op, value, by or pv.resolve_owner(None), at)
        stamp = event["at"].replace(":", "").replace("-", "").replace("+", "p")
        name = f"{stamp}-{secrets.token_hex(4)}.json"
        path = self.location.path(layout.run_dir(run_id), pv.ANNOTATIONS_DIR, name)
        if not fs.create_exclusive(self.location, path, dumps(event)):
            raise StoreError(f"annotation {name} of run {run_id!r} already exists; try again")
        return self.run(run_id)

    def tag(self, run_id: str, *tags: str) -> RunInfo:
        for tag in tags:
            self.annotate(run_id, "tag", tag)
        return self.run(run_id)

    def untag(self, run_id: str, *tags: str) -> RunInfo:
        for tag in tags:
            self.annotate(run_id, "untag", tag)
        return self.run(run_id)

    def describe(self, run_id: str, text: str) -> RunInfo:
        return self.annotate(run_id, "describe", text)

    def pin(self, run_id: str, pinned: bool = True) -> RunInfo:
        """Pin (or unpin) a run: ``interplab runs gc`` never deletes a pinned run."""
        return self.annotate(run_id, "pin" if pinned else "unpin")

    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its data. Committed data disappears atomically (manifest first)."""
        self.run(run_id)
        loc = self.location
        base = loc.path(layout.run_dir(run_id))
        fs.delete_file(loc, f"{base}/{layout.COMMIT_FILE}")
        self._records.pop(f"{base}/{layout.COMMIT_FILE}", None)
        self._delete_staging(run_id)
        fs.delete_dir(loc, base)
        self._records.pop(f"{base}/{layout.RUN_FILE}", None)

    def gc(self, older_than_hours: float | None = None) -> dict[str, int]:
        """Remove staging data nobody can see: data of failed runs, and (with ``older_than_hours``)
        of runs still ``running`` that were created longer ago than that (abandoned; marked failed).
        Failed runs keep their record. Also removes temporary files older than an hour."""
        report = {"failed_runs_cleaned": 0, "abandoned_runs_failed": 0, "temp_files_removed": 0}
        now = datetime.now(timezone.utc)
        for info in self.runs():
            if info.status == "running" and older_than_hours is not None:
                created = datetime.fromisoformat(info.created_at)
                if (now - created).total_seconds() > older_than_hours * 3600:
                    from interplab.store.writer import RunWriter

                    RunWriter(self, info.run_id).fail(f"abandoned: still running after {older_than_hours} h (gc)")
                    report["abandoned_runs_failed"] += 1
                    info = self.run(info.run_id)
            if info.status == "failed":
                if self._delete_staging(info.run_id):
                    report["failed_runs_cleaned"] += 1
        if self.location.local:
            cutoff = time.time() - 3600
            for listed in fs.list_files(self.location, self.location.root):
                if fs.TMP_MARK in listed.base_name and listed.mtime.timestamp() < cutoff:
                    fs.delete_file(self.location, listed.path)
                    report["temp_files_removed"] += 1
        return report

    def _delete_staging(self, run_id: str) -> bool:
        loc = self.location
        found = False
        for table in fs.list_dirs(loc, loc.path("data")):
            path = loc.path(layout.table_dir(table, run_id))
            if fs.list_files(loc, path):
                found = True
            fs.delete_dir(loc, path)
        if fs.list_files(loc, loc.path(layout.chunks_dir(run_id))):
            found = True
        fs.delete_dir(loc, loc.path(layout.chunks_dir(run_id)))
        return found

    # -- reading -------------------------------------------------------------------------------

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pa.Table:
        """Run one read-only SELECT over the committed data (views: see ``storage/README.md``)."""
        return self._current_session().execute(query, params)

    def explain(self, query: str, params: dict[str, Any] | None = None) -> str:
        """Run one read-only SELECT under DuckDB's ``EXPLAIN ANALYZE`` and return the profile text
        (time per operator; for each Parquet scan, the files it read out of those in the view)."""
        return self._current_session().explain(query, params)

    def saved(self, name: str, **params: Any) -> pa.Table:
        """Run the saved query ``storage/queries/<name>.sql`` with its parameters."""
        query = saved_query(name)
        return self.sql(query.sql, query.bind(params) or None)

    def views(self) -> list[str]:
        return list(self._current_session().views)

    def _current_session(self) -> Session:
        runs = self.runs()
        key = tuple((r.run_id, r.status, r.committed_at) for r in runs)
        if self._session is None or key != self._session_key:
            from interplab.store.query import Session  # DuckDB only for SQL: listing runs stays light

            self.close()
            self._session = Session(self.location, runs)
            self._session_key = key
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @overload
    def export(
        self,
        run_id: str,
        site: str,
        layer: int | None = None,
        head: int | None = None,
        *,
        with_index: Literal[False] = False,
    ) -> np.ndarray: ...

    @overload
    def export(
        self, run_id: str, site: str, layer: int | None = None, head: int | None = None, *, with_index: Literal[True]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...

    @overload
    def export(
        self, run_id: str, site: str, layer: int | None = None, head: int | None = None, *, with_index: bool
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]: ...

    def export(
        self, run_id: str, site: str, layer: int | None = None, head: int | None = None, *, with_index: bool = False
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """A committed run's activations of one site as ``float32[n, d]``, rows ordered by
        (prompt_id, position, head). ``site`` is a kind (``resid_pre``) with ``layer``/``head``, or the
        canonical form ``resid_pre.3`` / ``z.5.2``. With ``with_index`` also returns the row index."""
        import numpy as np

        from interplab.store import codec, reuse

        kind, layer, head = _parse_site(site, layer, head)
        info = self.run(run_id)
        if info.status != "committed":
            raise StoreError(f"run {run_id!r} is {info.status}; only committed runs can be exported")
        entries = [
            e
            for e in info.files
            if e.table == layout.ACTIVATIONS and e.site == kind and e.layer == layer and (head is None or e.head in (None, head))
        ]
        if not entries:
            sites = sorted({f"{e.site}" + ("" if e.layer is None else f".{e.layer}") for e in info.files if e.site})
            raise StoreError(f"run {run_id!r} has no activations for site {site!r}; it has: {', '.join(sites) or 'none'}")
        widths = {_width(e) for e in entries}
        if len(widths) != 1:
            raise StoreError(f"site {site!r} of run {run_id!r} mixes widths {sorted(widths)}; pass a head")
        acts: list[np.ndarray] = []
        index: dict[str, list[np.ndarray]] = {"prompt_id": [], "position": [], "head": []}
        for entry in entries:
            # a file another run made is read as this run shows it (store/reuse.py)
            table = reuse.read_activation_file(self.location, info, entry, ["prompt_id", "position", "head", "act"])
            if head is not None:
                import pyarrow.compute as pc  # only here: listing and SQL never need it

                table = table.filter(pc.equal(table["head"], head))
            acts.append(codec.decode_act(table["act"], entry.dtype or "float16", _width(entry)))
            for col in index:
                index[col].append(table[col].to_numpy(zero_copy_only=False))
        out = np.concatenate(acts)
        idx = {k: np.concatenate(v) for k, v in index.items()}
        heads = np.nan_to_num(idx["head"].astype(np.float64), nan=-1)
        order = np.lexsort((heads, idx["position"], idx["prompt_id"]))
        out = out[order]
        if not with_index:
            return out
        return out, {k: v[order] for k, v in idx.items()}

    def export_torch(self, run_id: str, site: str, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """:meth:`export` as a ``torch.Tensor`` (imports torch lazily)."""
        import torch

        return torch.from_numpy(self.export(run_id, site, layer, head))


def _width(entry: FileEntry) -> int:
    """The vector width of an activation file (every writer records it in the manifest)."""
    if entry.d is None:
        raise StoreError(f"activation file {entry.path} has no width (d) in its run's commit manifest")
    return entry.d


def _parse_site(site: str, layer: int | None, head: int | None) -> tuple[str, int | None, int | None]:
    if not isinstance(site, str) or not site:
        raise StoreError(f"site must be a string like 'resid_pre.3', got {site!r}")
    parts = site.split(".")
    if len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
        raise StoreError(f"cannot parse site {site!r}: expected 'kind[.layer[.head]]', e.g. 'z.5.2'")
    kind = layout.check_site_kind(parts[0])
    if len(parts) >= 2:
        layer = int(parts[1])
    if len(parts) == 3:
        head = int(parts[2])
    return kind, layer, head


def _jsonable(value: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict (or a pydantic model), got {type(value).__name__}")
    try:
        out: dict[str, Any] = json.loads(json.dumps(value, default=str))  # a dict, round-tripped
        return out
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serialisable: {exc}") from None


def _is_event(name: str) -> bool:
    return name.endswith(".json") and fs.TMP_MARK not in name
