"""Where a store lives: a POSIX directory or ``s3://bucket/prefix``, both through ``pyarrow.fs``.

Every write the store makes is *atomic per object*: on POSIX a temporary file in the same directory
is renamed over the final name (``rename(2)`` is atomic); on S3 a single PUT (or a completed
multipart upload) is atomic by the service's contract. Readers therefore never see half an object.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from interplab.store.errors import StoreError

DEFAULT_STORE = "./interplab-store"
STORE_ENV = "INTERPLAB_STORE"
TMP_MARK = ".tmp-"
_IOV_MAX = 1024  # buffers per writev(2) call (Linux's and macOS's IOV_MAX)


@dataclass(frozen=True)
class Location:
    """A resolved store URI: the filesystem, the root path inside it, and whether it is local."""

    uri: str
    fs: pafs.FileSystem
    root: str
    local: bool

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))


def resolve(uri: str | None) -> Location:
    """Resolve ``uri`` (None → ``$INTERPLAB_STORE`` → ``./interplab-store``) to a :class:`Location`."""
    if uri is None or uri == "":
        uri = os.environ.get(STORE_ENV) or DEFAULT_STORE
    if uri.startswith("s3://"):
        return _resolve_s3(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StoreError(f"store URI {uri!r}: unsupported scheme {scheme!r}; use a directory or s3://bucket/prefix")
    root = os.path.abspath(os.path.expanduser(uri))
    return Location(uri=root, fs=pafs.LocalFileSystem(), root=root, local=True)


def _resolve_s3(uri: str) -> Location:
    rest = uri[len("s3://") :].strip("/")
    if not rest or rest.startswith("/"):
        raise StoreError(f"store URI {uri!r}: expected s3://bucket/prefix")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, str | bool] = {"region": region, "allow_delayed_open": True}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    try:
        fs = pafs.S3FileSystem(**kwargs)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot open S3 store {uri!r}: {exc}") from None
    return Location(uri=f"s3://{rest}", fs=fs, root=rest, local=False)


def exists(loc: Location, path: str) -> bool:
    if loc.local:
        return os.path.exists(path)
    return bool(loc.fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(loc: Location, path: str) -> bytes | None:
    """The object's bytes, or None if it does not exist."""
    try:
        if loc.local:
            with open(path, "rb") as f:
                return f.read()
        with loc.fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data
    except FileNotFoundError:
        return None
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise


def _temp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def _replace_local(path: str, write: Callable[[str], None]) -> int:
    """``write(tmp)`` a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX);
    the temporary file is removed if anything fails. Returns the file's size."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def write_bytes(loc: Location, path: str, data: bytes | pa.Buffer) -> int:
    """Atomically create or replace one object; return its size. On S3 one PUT of the whole object
    (pyarrow's output streams cannot abort an upload, so no Python code runs between open and close)."""
    if loc.local:

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        return _replace_local(path, write)
    with loc.fs.open_output_stream(path) as f:
        f.write(data)
    return len(data) if not isinstance(data, pa.Buffer) else data.size


def create_exclusive(loc: Location, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; return False if it already did.

    POSIX: ``link(2)`` of a complete temporary file, which fails atomically if the name exists.
    S3 has no portable create-if-absent through pyarrow, so it is check-then-put there; run ids carry
    a random suffix, so two writers never pick the same one by chance.
    """
    if not loc.local:
        if exists(loc, path):
            return False
        write_bytes(loc, path, data)
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def write_parquet(loc: Location, path: str, table: pa.Table, **options: object) -> int:
    """Atomically write ``table`` as one Parquet object; return its size in bytes (``options`` go
    to ``pyarrow.parquet.write_table``)."""
    if loc.local:
        return _replace_local(path, lambda tmp: pq.write_table(table, tmp, **options))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return write_bytes(loc, path, sink.getvalue())


def write_parts(loc: Location, path: str, parts: Sequence[bytes | memoryview]) -> int:
    """Atomically write one object made of ``parts`` (written in order, not joined); return its size.

    POSIX: temp file + ``rename(2)``, the parts handed to ``writev(2)`` in batches, so large parts go
    from the caller's buffers to the page cache without a copy. S3: the parts joined and written in
    one PUT, as :func:`write_bytes` does.
    """
    if not loc.local:
        return write_bytes(loc, path, b"".join(parts))

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _writev_all(fd, parts)
        finally:
            os.close(fd)

    return _replace_local(path, write)


def _writev_all(fd: int, parts: Sequence[bytes | memoryview]) -> int:
    pending = [memoryview(p).cast("B") for p in parts if len(p)]
    size = sum(len(p) for p in pending)
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch) if hasattr(os, "writev") else os.write(fd, batch[0])  # no writev: one at a time
        if written <= 0:
            raise OSError(f"writev wrote {written} bytes")
        done = 0
        while done < len(batch) and written >= len(batch[done]):  # drop whole parts, cut a partial one
            written -= len(batch[done])
            done += 1
        pending = pending[done:]
        if written:
            pending[0] = pending[0][written:]
    return size


def list_files(loc: Location, prefix: str) -> list[pafs.FileInfo]:
    """All files (not directories) under ``prefix``, recursively; empty if it does not exist."""
    selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return [info for info in loc.fs.get_file_info(selector) if info.type == pafs.FileType.File]


def list_dirs(loc: Location, prefix: str) -> list[str]:
    """Names of the immediate sub-directories of ``prefix``."""
    selector = pafs.FileSelector(prefix, recursive=False, allow_not_found=True)
    return sorted(info.base_name for info in loc.fs.get_file_info(selector) if info.type == pafs.FileType.Directory)


def delete_file(loc: Location, path: str) -> None:
    try:
        loc.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
            raise


def delete_dir(loc: Location, path: str) -> None:
    try:
        loc.fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
            raise
