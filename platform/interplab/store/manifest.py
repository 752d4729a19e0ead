"""Run records: provenance (``run.json``), failure (``failed.json``) and the commit manifest (``commit.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from interplab.store.errors import StoreError

RunStatus = Literal["running", "committed", "failed"]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class FileEntry:
    """One committed data file. ``path`` is relative to the store root."""

    table: str
    path: str
    chunk: str
    rows: int
    bytes: int
    site: str | None = None
    layer: int | None = None
    head: int | None = None
    dtype: str | None = None
    d: int | None = None
    # set when the file belongs to another committed run that this run reuses (store/reuse.py):
    # the run shows only the rows its ``reused_rows`` table selects, under its own run and prompt ids
    source_run: str | None = None
    # ``layout.schema_hash`` of the file's columns (names and Arrow types); files of one view that all
    # carry the same hash are read without reconciling their schemas (store/query.py). None: unknown
    # (manifests written before the field existed), read as if every file could differ
    schema_hash: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileEntry:
        fields: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}  # a JSON record's values
        return cls(**fields)


@dataclass(frozen=True)
class RunInfo:
    """Everything the store knows about one run."""

    run_id: str
    kind: str
    status: RunStatus
    model: str | None
    weight_hash: str | None
    spec: dict[str, Any] | None
    package_version: str | None
    user: str | None
    host: str | None
    created_at: str
    committed_at: str | None = None
    failed_at: str | None = None
    error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    # provenance v2 (runs written before it read these as None / empty)
    owner: str | None = None
    team: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    spec_hash: str | None = None
    dataset_hash: str | None = None
    inputs: tuple[str, ...] = ()
    timings: dict[str, Any] = field(default_factory=dict)
    # annotations written after the run (runs/<id>/annotations/)
    tags: tuple[str, ...] = ()
    description: str | None = None
    pinned: bool = False
    # where it was read from (a Store fills these; a catalog names its entries)
    store: str | None = None

    @property
    def n_bytes(self) -> int:
        """Bytes of the committed files its manifest lists that are its own (not another run's it reuses)."""
        return sum(e.bytes for e in self.files if getattr(e, "source_run", None) is None)

    @property
    def rows(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.files:
            out[entry.table] = out.get(entry.table, 0) + entry.rows
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["files"] = len(self.files)
        out["rows"] = self.rows
        out["bytes"] = self.n_bytes
        out["inputs"] = list(self.inputs)
        out["tags"] = list(self.tags)
        return out


def dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, default=str).encode()


def loads(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"corrupt store record {what}: {exc}") from None
    if not isinstance(data, dict):
        raise StoreError(f"corrupt store record {what}: not a JSON object")
    return data


def build_info(
    record: dict[str, Any],
    failed: dict[str, Any] | None,
    commit: dict[str, Any] | None,
    *,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    pinned: bool = False,
    store: str | None = None,
    team: str | None = None,
) -> RunInfo:
    """A :class:`RunInfo` from a run's records. Fields a record lacks (older runs) are None/empty;
    ``team`` is used when the run records none (the team area it sits in)."""
    status: RunStatus = "committed" if commit is not None else "failed" if failed is not None else "running"
    raw_git, raw_inputs = record.get("git"), record.get("inputs")
    git: dict[str, Any] = raw_git if isinstance(raw_git, dict) else {}
    inputs: list[Any] = raw_inputs if isinstance(raw_inputs, list) else []
    return RunInfo(
        run_id=record["run_id"],
        kind=record.get("kind", ""),
        status=status,
        model=record.get("model"),
        weight_hash=record.get("weight_hash"),
        spec=record.get("spec"),
        package_version=record.get("package_version"),
        user=record.get("user"),
        host=record.get("host"),
        created_at=record.get("created_at", ""),
        committed_at=commit.get("committed_at") if commit else None,
        failed_at=failed.get("failed_at") if failed and not commit else None,
        error=failed.get("reason") if failed and not commit else None,
        provenance=record.get("provenance") or {},
        metadata=(commit or {}).get("metadata") or {},
        files=tuple(FileEntry.from_dict(f) for f in (commit or {}).get("files", [])),
        owner=record.get("owner") or record.get("user"),
        team=record.get("team") or team,
        git_commit=git.get("commit"),
        git_dirty=git.get("dirty"),
        spec_hash=record.get("spec_hash"),
        dataset_hash=record.get("dataset_hash"),
        inputs=tuple(str(i) for i in inputs),
        timings=run_timings(record, commit),
        tags=tags,
        description=description,
        pinned=pinned,
        store=store,
    )


def run_timings(record: dict[str, Any], commit: dict[str, Any] | None) -> dict[str, Any]:
    """``created_at``, ``committed_at``, ``wall_s`` (the driver's, else commit − create) and the
    driver's per-phase seconds (``phases``), from ``run.json`` and the commit's ``metadata.timings``."""
    created = record.get("created_at")
    committed = (commit or {}).get("committed_at")
    given = ((commit or {}).get("metadata") or {}).get("timings")
    given = given if isinstance(given, dict) else {}
    wall = given.get("wall_s")
    if wall is None and created and committed:
        try:
            wall = (datetime.fromisoformat(committed) - datetime.fromisoformat(created)).total_seconds()
        except ValueError:
            wall = None
    out: dict[str, Any] = {"created_at": created, "committed_at": committed, "wall_s": wall}
    if isinstance(given.get("phases"), dict):
        out["phases"] = given["phases"]
    return out
