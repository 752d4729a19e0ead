"""Where a store lives: a POSIX directory or ``s3://bucket/prefix``, both through ``pyarrow.fs``.

Every write the store makes is *atomic per object*: on POSIX a temporary file in the same directory
is renamed over the final name (``rename(2)`` is atomic); on S3 a single PUT (or a completed
multipart upload) is atomic by the service's contract. Readers therefore never see half an object.

Create-if-absent objects (``run.json``, ``commit.json``, the store marker) use ``link(2)`` on POSIX and
a conditional PUT (``If-None-Match: *``, through boto3: pyarrow cannot send it) on S3, so writers on
different machines never both create the same one.

Shared folders: in a directory with the setgid bit (a team area, :mod:`interplab.store.teams`) every
file and folder the store writes is made group-writable (files ``rw-rw-r--``, folders ``rwxrwsr-x``,
the "other" bits copied from the folder above) whatever the writer's umask, so every member of the
team can write after any other. A write the filesystem or the S3 service refuses raises one
:class:`StoreError` naming the area, its owner group (POSIX) and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from interplab.store.errors import StoreError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

DEFAULT_STORE = "./interplab-store"
STORE_ENV = "INTERPLAB_STORE"
TMP_MARK = ".tmp-"
_IOV_MAX = 1024  # buffers per writev(2) call (Linux's and macOS's IOV_MAX)


@dataclass(frozen=True)
class Location:
    """A resolved store URI: the root path inside its filesystem, and whether it is local.

    A local store is read and written with ``os`` calls; :attr:`fs` (a ``pyarrow.fs`` filesystem, for
    readers that take one) is made on first use, so listing runs never imports pyarrow."""

    uri: str
    root: str
    local: bool
    remote: Any = field(default=None, compare=False, repr=False)  # the S3 filesystem; None locally

    @functools.cached_property
    def fs(self) -> pafs.FileSystem:
        if self.remote is not None:
            remote: pafs.FileSystem = self.remote
            return remote
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its path in the store's filesystem, its size and modification time."""

    path: str
    size: int
    mtime: datetime

    @property
    def base_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


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
    return Location(uri=root, root=root, local=True)


def _resolve_s3(uri: str) -> Location:
    import pyarrow.fs as pafs

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
    return Location(uri=f"s3://{rest}", root=rest, local=False, remote=fs)


def exists(loc: Location, path: str) -> bool:
    if loc.local:
        return os.path.exists(path)
    import pyarrow.fs as pafs

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
    file_mode = _makedirs(os.path.dirname(path))
    tmp = _temp_name(path)
    try:
        write(tmp)
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def _shared_modes(dir_mode: int) -> tuple[int, int] | None:
    """(file mode, folder mode) for what is written inside a folder of mode ``dir_mode``: group-writable
    when the folder has the setgid bit (a team area), the "other" bits copied from it; else None
    (the writer's umask decides, as for any file)."""
    if not dir_mode & stat.S_ISGID:
        return None
    other = dir_mode & 0o005
    return 0o660 | (other & 0o004), 0o2770 | other


def _makedirs(path: str) -> int | None:
    """``os.makedirs(path, exist_ok=True)``, making every folder it creates inside a setgid folder
    group-writable; returns the mode files written in ``path`` get (None: leave them to the umask)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        _makedirs(parent)
        shared = _shared_modes(os.stat(parent).st_mode)
        try:
            if shared is None:
                os.mkdir(path)
            else:
                _mkdir_shared(path, shared[1])
        except FileExistsError:
            pass
        mode = os.stat(path).st_mode
    shared = _shared_modes(mode)
    return None if shared is None else shared[0]


def _mkdir_shared(path: str, mode: int) -> None:
    """Create folder ``path`` already carrying ``mode``: made under a temporary name, ``chmod``ed, then
    renamed into place, so another writer never finds it with the creator's umask bits. If ``path``
    appeared meanwhile (another writer's, made the same way) that one is kept."""
    tmp = _temp_name(path)
    os.mkdir(tmp)
    try:
        os.chmod(tmp, mode)
        os.rename(tmp, path)  # replaces only an empty folder, which has the same mode
    except OSError as exc:
        os.rmdir(tmp)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(path):
            raise


def write_bytes(loc: Location, path: str, data: bytes | pa.Buffer) -> int:
    """Atomically create or replace one object; return its size. On S3 one PUT of the whole object
    (pyarrow's output streams cannot abort an upload, so no Python code runs between open and close)."""
    with _writing(loc, path):
        if loc.local:

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    f.write(data)

            return _replace_local(path, write)
        with loc.fs.open_output_stream(path) as f:
            f.write(data)
        return memoryview(data).nbytes


def create_exclusive(loc: Location, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; return False if it already did.

    POSIX: ``link(2)`` of a complete temporary file, which fails atomically if the name exists.
    S3: one PUT with ``If-None-Match: *`` (S3 and S3-compatible services answer 412 if the key
    exists), so of any number of writers on any number of machines exactly one creates the object.
    """
    with _writing(loc, path):
        if not loc.local:
            return _s3_put_if_absent(loc, path, data)
        file_mode = _makedirs(os.path.dirname(path))
        tmp = _temp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            if file_mode is not None:
                os.chmod(tmp, file_mode)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_parquet(loc: Location, path: str, table: pa.Table, **options: object) -> int:
    """Atomically write ``table`` as one Parquet object; return its size in bytes (``options`` go
    to ``pyarrow.parquet.write_table``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if loc.local:
        with _writing(loc, path):
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

    with _writing(loc, path):
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


def list_files(loc: Location, prefix: str) -> list[FileInfo]:
    """All files (not directories) under ``prefix``, recursively; empty if it does not exist."""
    if loc.local:
        out: list[FileInfo] = []
        _walk_local(prefix, out)
        return out
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return [
        FileInfo(info.path, info.size, info.mtime) for info in loc.fs.get_file_info(selector) if info.type == pafs.FileType.File
    ]


def _walk_local(folder: str, out: list[FileInfo]) -> None:
    try:
        entries = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            path = f"{folder}/{entry.name}"
            try:
                if entry.is_dir():
                    _walk_local(path, out)
                elif entry.is_file():
                    st = entry.stat()
                    out.append(FileInfo(path, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
            except FileNotFoundError:  # removed while listing (a temporary file renamed into place)
                continue


def list_dirs(loc: Location, prefix: str) -> list[str]:
    """Names of the immediate sub-directories of ``prefix``."""
    if loc.local:
        try:
            with os.scandir(prefix) as entries:
                return sorted(entry.name for entry in entries if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(prefix, recursive=False, allow_not_found=True)
    return sorted(info.base_name for info in loc.fs.get_file_info(selector) if info.type == pafs.FileType.Directory)


def delete_file(loc: Location, path: str) -> None:
    try:
        with _writing(loc, path):
            loc.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
            raise


def delete_dir(loc: Location, path: str) -> None:
    try:
        with _writing(loc, path):
            loc.fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
            raise


# -- refused writes ------------------------------------------------------------------------------

_S3_DENIED = ("ACCESS_DENIED", "AccessDenied", "Access Denied", "Forbidden", "HTTP response code: 403")


@contextlib.contextmanager
def _writing(loc: Location, path: str) -> Iterator[None]:
    """Turn a write the storage refuses into one :class:`StoreError` that says what to do."""
    try:
        yield
    except PermissionError as exc:
        raise StoreError(_denied_posix(loc, path, exc)) from None
    except OSError as exc:
        if not loc.local and any(mark in str(exc) for mark in _S3_DENIED):
            raise StoreError(_denied_s3(loc, path)) from None
        raise


def _denied_posix(loc: Location, path: str, exc: PermissionError) -> str:
    """Which area refused, its group, who is writing, and what to do."""
    area = loc.root
    try:
        info = os.stat(area)
    except OSError:
        return f"cannot write {path} in store {loc.uri}: {exc.strerror or exc}"
    group = _group_name(info.st_gid)
    user = _user_name()
    where = f"store area {area} (group {group!r}, mode {stat.filemode(info.st_mode)})"
    if info.st_gid not in os.getgroups() and info.st_gid != os.getegid():
        return (
            f"permission denied: user {user!r} cannot write to {where}: only members of group {group!r} "
            f"may write there. Ask a lab admin to add you (usermod -aG {group} {user}; then log in again), "
            "or write to your own team's area (interplab team list LAB_ROOT)"
        )
    return (
        f"permission denied: user {user!r} cannot write {path} in {where}: {exc.strerror or exc}. "
        "A folder in the area has lost its group-write bit; a lab admin can repair it with "
        f"chmod -R g+rwX {area} && find {area} -type d -exec chmod g+s {{}} +"
    )


def _denied_s3(loc: Location, path: str) -> str:
    bucket, _, key = path.partition("/")
    return (
        f"permission denied: the S3 service refused to write s3://{bucket}/{key} in store {loc.uri} "
        f"(access key {os.environ.get('AWS_ACCESS_KEY_ID', '(default credentials)')!r}). Your IAM policy "
        "does not allow writing under this prefix: ask a lab admin for your team's write policy "
        "(storage/policies/team-write.json), or write to your own team's area"
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# -- S3 conditional writes -----------------------------------------------------------------------


def _s3_put_if_absent(loc: Location, path: str, data: bytes) -> bool:
    """One ``PutObject`` with ``If-None-Match: *``; False if the key already exists (412). A 409
    (another conditional write to the same key in flight) is retried: the loser then sees 412."""
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    client = _s3_client(*_s3_settings())
    for _attempt in range(5):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or error.get("Code") == "PreconditionFailed":
                return False
            if status == 409 or error.get("Code") == "ConditionalRequestConflict":
                continue
            if status == 403 or error.get("Code") in ("AccessDenied", "Forbidden"):
                raise StoreError(_denied_s3(loc, path)) from None
            raise OSError(f"S3 conditional PUT of s3://{path} failed: {exc}") from None
    raise OSError(f"S3 conditional PUT of s3://{path}: still conflicting after 5 attempts")


def _s3_settings() -> tuple[str | None, str, str | None, str | None, str | None]:
    """The endpoint, region and credentials pyarrow's S3 filesystem uses (the same variables)."""
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN")


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str, access_key: str | None, secret_key: str | None, token: str | None) -> Any:
    """A boto3 S3 client for these settings (credentials None → boto3's default chain: profiles, roles)."""
    try:
        import boto3
    except ImportError:
        raise StoreError(
            "writing to an S3 store needs boto3 (for conditional PUTs, which pyarrow cannot send): pip install boto3"
        ) from None
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, aws_session_token=token, region_name=region
    )
    return session.client("s3", endpoint_url=endpoint)
