"""Object names inside a store (documented in ``storage/README.md``) and the known table schemas.

::

    <store>/interplab-store.json                       store marker (format, version)
    <store>/runs/<run_id>/run.json                     provenance, written once by begin_run
    <store>/runs/<run_id>/failed.json                  present ⇒ status failed (reason, time)
    <store>/runs/<run_id>/commit.json                  present ⇒ committed; the file list readers use
    <store>/chunks/<run_id>/<table>/<key>.json         chunk-done markers (resume bookkeeping)
    <store>/data/activations/run_id=<id>/site=<kind>/layer=<n|NULL>/chunk-<key>[-h<head>].parquet
    <store>/data/<table>/run_id=<id>/chunk-<key>.parquet   prompts, patching, baselines, edges, ...
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from interplab.store.errors import StoreError

FORMAT_NAME = "interplab-store"
FORMAT_VERSION = 1
MARKER = "interplab-store.json"
RUN_FILE = "run.json"
FAILED_FILE = "failed.json"
COMMIT_FILE = "commit.json"
ACTIVATIONS = "activations"
PROMPTS = "prompts"
NULL_PARTITION = "NULL"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_TABLE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_SITE_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

if TYPE_CHECKING:
    import pyarrow as pa

    # Result tables whose schema other components rely on (built on first use, see ``_known_schemas``).
    KNOWN_SCHEMAS: dict[str, pa.Schema]


def _known_schemas() -> dict[str, pa.Schema]:
    """Result tables whose schema other components rely on. ``run_id`` is added by the store (from
    the partition path), so it is not part of the written schema."""
    import pyarrow as pa

    return {
        "patching": pa.schema(
            [
                ("sweep", pa.string()),
                ("method", pa.string()),
                ("layer", pa.int32()),
                ("position", pa.int32()),
                ("head", pa.int32()),
                ("value", pa.float64()),
                ("normalized", pa.float64()),
            ]
        ),
        "baselines": pa.schema([("sweep", pa.string()), ("name", pa.string()), ("value", pa.float64())]),
        PROMPTS: pa.schema(
            [
                ("prompt_id", pa.int64()),
                ("n_tokens", pa.int32()),
                ("token_ids", pa.list_(pa.int32())),
                ("tokens", pa.list_(pa.string())),
            ]
        ),
    }


def __getattr__(name: str) -> Any:
    """``KNOWN_SCHEMAS`` is made on first use: the names and paths above need no pyarrow."""
    if name == "KNOWN_SCHEMAS":
        schemas = _known_schemas()
        globals()["KNOWN_SCHEMAS"] = schemas
        return schemas
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _NAME.match(run_id):
        raise StoreError(f"invalid run id {run_id!r}: use 1-128 letters, digits, '_', '-', '.', starting with a letter or digit")
    return run_id


def check_table(name: str) -> str:
    if not isinstance(name, str) or not _TABLE.match(name):
        raise StoreError(f"invalid table name {name!r}: use lower-case letters, digits and '_', e.g. 'patching'")
    if name == ACTIVATIONS:
        raise StoreError("the activations table is written with write_activations / write_capture_chunk")
    return name


def check_site_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _SITE_KIND.match(kind):
        raise StoreError(f"invalid site kind {kind!r}: expected e.g. 'resid_pre'")
    return kind


def chunk_key(chunk: str | int) -> str:
    """The canonical file-name form of a chunk key: ints zero-padded (``000003``), strings as given."""
    if isinstance(chunk, bool):
        raise StoreError(f"invalid chunk key {chunk!r}: use a non-negative int or a short name")
    if isinstance(chunk, int):
        if chunk < 0:
            raise StoreError(f"invalid chunk key {chunk!r}: must be non-negative")
        return f"{chunk:06d}"
    if isinstance(chunk, str) and _NAME.match(chunk) and ".tmp-" not in chunk:
        return chunk
    raise StoreError(f"invalid chunk key {chunk!r}: use a non-negative int or letters, digits, '_', '-', '.'")


def parse_chunk_key(key: str) -> str | int:
    return int(key) if key.isdigit() else key


def run_dir(run_id: str) -> str:
    return f"runs/{run_id}"


def table_dir(table: str, run_id: str) -> str:
    return f"data/{table}/run_id={run_id}"


def activation_file(run_id: str, site: str, layer: int | None, head: int | None, key: str) -> str:
    layer_part = NULL_PARTITION if layer is None else str(layer)
    head_part = "" if head is None else f"-h{head}"
    return f"{table_dir(ACTIVATIONS, run_id)}/site={site}/layer={layer_part}/chunk-{key}{head_part}.parquet"


def table_file(table: str, run_id: str, key: str) -> str:
    return f"{table_dir(table, run_id)}/chunk-{key}.parquet"


def chunk_marker(run_id: str, table: str, key: str) -> str:
    return f"{chunks_dir(run_id)}/{table}/{key}.json"


def chunks_dir(run_id: str) -> str:
    return f"chunks/{run_id}"


def file_chunk_key(relpath: str) -> str | None:
    """The chunk key of a data file name (``chunk-000003-h2.parquet`` → ``000003``)."""
    base = relpath.rsplit("/", 1)[-1]
    if not base.startswith("chunk-") or not base.endswith(".parquet") or ".tmp-" in base:
        return None
    stem = base[len("chunk-") : -len(".parquet")]
    return re.sub(r"-h\d+$", "", stem)


def schema_hash(schema: pa.Schema) -> str:
    """A short fingerprint of a data file's columns: their names, order and Arrow types (no metadata).

    Recorded per file in the commit manifest (``FileEntry.schema_hash``); two files with the same hash
    have the same columns of the same types, so a reader can take one file's schema for both."""
    text = ";".join(f"{field.name}:{field.type}" for field in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_partitions(relpath: str) -> dict[str, str]:
    """``key=value`` directory parts of a data path."""
    out = {}
    for part in relpath.split("/")[:-1]:
        if "=" in part:
            key, value = part.split("=", 1)
            out[key] = value
    return out
