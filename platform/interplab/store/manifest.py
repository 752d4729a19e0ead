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


def build_info(record: dict[str, Any], failed: dict[str, Any] | None, commit: dict[str, Any] | None) -> RunInfo:
    status: RunStatus = "committed" if commit is not None else "failed" if failed is not None else "running"
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
    )
