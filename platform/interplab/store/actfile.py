"""A minimal Parquet writer for exactly one layout: the activation files ``RunWriter`` writes.

Why not pyarrow here (``docs/store.md``): pyarrow's Parquet encoder copies every page twice, which
caps a bare fixed-length-binary column at ≈ 2–2.4 GB/s per thread, half a page-cache write on the
machines we measured. This module writes the same columns, Parquet types and footer metadata, but the
``act`` bytes go from the caller's numpy array to the file as ``memoryview`` slices, never copied;
everything else (the small columns, page headers, the footer) is a few % of the bytes.

File: ``PAR1``; per row group (≤ ~64 MiB, so DuckDB can read big files in parallel) one column chunk
per column, each a run of v1 data pages of ~1 MiB (UNCOMPRESSED, PLAIN values, RLE/bit-packed
definition levels: every column is OPTIONAL, as pyarrow writes a nullable Arrow field); then the
Thrift-compact ``FileMetaData`` with min/max/null-count statistics per row group for the columns that
ask for them, its 4-byte length, ``PAR1``. Verified by reading files back with pyarrow and DuckDB
(``tests/store/test_actfile.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from interplab.store import codec
from interplab.store.errors import StoreError

MAGIC = b"PAR1"
PAGE_BYTES = 1 << 20  # target size of one data page's values
ROW_GROUP_BYTES = 64 << 20  # target size of one row group
CREATED_BY = "interplab-actfile version 1.0.0"
_INLINE = 64 << 10  # value slices shorter than this are copied into the surrounding small writes

# Parquet enums (parquet.thrift)
INT32, INT64, BYTE_ARRAY, FIXED_LEN_BYTE_ARRAY = 1, 2, 6, 7
_OPTIONAL, _REQUIRED = 1, 0
_UTF8 = 0  # ConvertedType
_PLAIN, _RLE = 0, 3  # Encoding
_UNCOMPRESSED = 0
_DATA_PAGE = 0
_FORMAT_VERSION = 2

# -- Thrift compact protocol (only what the footer and page headers need) -------------------------

BOOL, I16, I32, I64, BINARY, LIST, STRUCT = 1, 4, 5, 6, 8, 9, 12
Field = tuple[int, int, Any]  # (field id, compact type, value); value None = unset optional field


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _encode_value(ctype: int, value: Any) -> bytes:
    if ctype == I32 or ctype == I64 or ctype == I16:
        return _varint((value << 1) ^ (value >> 63))
    if ctype == STRUCT:
        encoded: bytes = value  # already encoded by thrift_struct
        return encoded
    if ctype == BINARY:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return _varint(len(data)) + data
    if ctype == LIST:
        return value if isinstance(value, bytes) else thrift_list(*value)
    raise ValueError(f"unsupported thrift compact type {ctype}")


def thrift_list(elem: int, items: Sequence[Any]) -> bytes:
    """A list's compact encoding (its header and items), to pass as a LIST field's value."""
    size = len(items)
    head = bytes([(size << 4) | elem]) if size < 15 else bytes([0xF0 | elem]) + _varint(size)
    return head + b"".join(_encode_value(elem, item) for item in items)


def thrift_struct(*fields: Field) -> bytes:
    """One struct in Thrift's compact protocol; ``fields`` in ascending id order, None values skipped.

    Values: ints for I16/I32/I64, bool for BOOL, str/bytes for BINARY, an encoded struct for STRUCT,
    ``(element type, items)`` or an encoded :func:`thrift_list` for LIST.
    """
    out = bytearray()
    last = 0
    for fid, ctype, value in fields:
        if value is None:
            continue
        if ctype == BOOL:
            ctype, body = (1 if value else 2), b""
        else:
            body = _encode_value(ctype, value)
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | ctype)
        else:
            out.append(ctype)
            out += _varint(_zigzag(fid))
        out += body
        last = fid
    out.append(0)
    return bytes(out)


# -- columns ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column's PLAIN-encoded non-null values, in row order, and how rows map onto them."""

    name: str
    physical: int  # Parquet physical type
    data: np.ndarray  # uint8: the PLAIN bytes of the non-null values (a view of the caller's array if possible)
    n_rows: int
    width: int = 0  # bytes per value (fixed-width types); 0 = variable, see ``offsets``
    offsets: np.ndarray | None = None  # int64[n_values + 1]: value i is data[offsets[i]:offsets[i+1]]
    valid: np.ndarray | None = None  # bool[n_rows]; None = no nulls
    stats: np.ndarray | None = None  # the non-null values, for min/max statistics; None = no statistics
    string: bool = False  # BYTE_ARRAY annotated STRING (UTF8)

    def value_index(self, row: int) -> int:
        """How many non-null values precede ``row``."""
        return row if self.valid is None else int(np.count_nonzero(self.valid[:row]))

    def byte_at(self, value: int) -> int:
        return value * self.width if self.offsets is None else int(self.offsets[value])


def int_column(name: str, values: np.ndarray, dtype: str, *, stats: bool = False) -> Column:
    """An int32 (``dtype="<i4"``) or int64 (``"<i8"``) column without nulls."""
    arr = np.ascontiguousarray(values, dtype=dtype)
    physical = INT64 if arr.itemsize == 8 else INT32
    return Column(name, physical, arr.view(np.uint8), len(arr), width=arr.itemsize, stats=arr if stats else None)


def null_column(name: str, n: int) -> Column:
    """An int32 column of ``n`` nulls."""
    empty = np.zeros(0, "<i4")
    return Column(name, INT32, empty.view(np.uint8), n, width=4, valid=np.zeros(n, bool), stats=empty)


def fixed_column(name: str, rows: np.ndarray) -> Column:
    """A FIXED_LEN_BYTE_ARRAY column, one value per row of the C-contiguous ``rows`` ``[n, ...]`` (no copy)."""
    if not rows.flags.c_contiguous:
        raise StoreError(f"column {name!r}: values must be C-contiguous")
    n = rows.shape[0]
    width = rows.nbytes // n if n else rows.dtype.itemsize * int(np.prod(rows.shape[1:]))
    return Column(name, FIXED_LEN_BYTE_ARRAY, rows.reshape(-1).view(np.uint8), n, width=width)


def string_column(name: str, values: pa.Array) -> Column:
    """A BYTE_ARRAY/STRING column from an Arrow string array, PLAIN-encoded without a per-row Python loop.

    PLAIN is ``<u32 length><bytes>`` per value: the lengths and the strings are put in one Arrow binary
    array (lengths first, then strings) and Arrow's ``take`` interleaves them in one pass.
    """
    if pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    if not pa.types.is_string(values.type):
        raise StoreError(f"column {name!r} must be strings, got {values.type}")
    n = len(values)
    valid = None
    if values.null_count:
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        values = values.drop_null()
    count = len(values)
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + count + 1].astype(np.int64)
    data_buf = values.buffers()[2]
    body = np.frombuffer(data_buf, np.uint8)[offsets[0] : offsets[-1]] if count and data_buf else np.zeros(0, np.uint8)
    total = 4 * count + len(body)
    if total >= 1 << 31:
        raise StoreError(f"column {name!r}: {total} bytes of strings in one file; write fewer rows per file")
    both = np.concatenate((np.diff(offsets).astype("<u4").view(np.uint8), body))
    both_offsets = np.concatenate((np.arange(0, 4 * count, 4), 4 * count + offsets - offsets[0])).astype(np.int32)
    pieces = pa.Array.from_buffers(pa.binary(), 2 * count, [None, pa.py_buffer(both_offsets), pa.py_buffer(both)])
    order = np.empty(2 * count, np.int32)
    order[0::2] = np.arange(count)
    order[1::2] = np.arange(count, 2 * count)
    plain = pieces.take(pa.array(order))
    out = np.frombuffer(plain.buffers()[2], np.uint8)[:total] if total else np.zeros(0, np.uint8)
    value_offsets = np.frombuffer(plain.buffers()[1], np.int32)[0 : 2 * count + 1 : 2].astype(np.int64)
    return Column(name, BYTE_ARRAY, out, n, offsets=value_offsets, valid=valid, string=True)


# -- the activation layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyColumns:
    """The row keys of one site's rows (prompt_id, position, token_id, token), validated and encoded.

    A capture chunk's sites share them: build once, write many files.
    """

    n: int
    prompt_id: np.ndarray  # int64[n]
    position: np.ndarray  # int32[n]
    token_id: np.ndarray  # int32[n]
    token: pa.Array  # string[n]
    columns: tuple[Column, ...]

    @classmethod
    def build(cls, prompt_id: Any, position: Any, token_id: Any, token: Sequence[str] | pa.Array) -> KeyColumns:
        n = len(prompt_id)
        ints = [
            _ints(name, v, n, t)
            for name, v, t in (("prompt_id", prompt_id, "<i8"), ("position", position, "<i4"), ("token_id", token_id, "<i4"))
        ]
        tokens = _tokens(token, n)
        columns = (
            int_column("prompt_id", ints[0], "<i8", stats=True),
            int_column("position", ints[1], "<i4", stats=True),
            int_column("token_id", ints[2], "<i4"),
            string_column("token", tokens),
        )
        return cls(n, ints[0], ints[1], ints[2], tokens, columns)

    def repeat(self, times: int) -> KeyColumns:
        """Every row ``times`` times in a row (the rows of an all-heads site: one per (row, head))."""
        take = np.repeat(np.arange(self.n), times)
        return KeyColumns.build(self.prompt_id[take], self.position[take], self.token_id[take], self.token.take(take))


def head_column(head: int | np.ndarray | None, n: int) -> Column:
    """``head``: None (whole-stream site, all null), one int for every row, or ``int[n]``."""
    if head is None:
        return null_column("head", n)
    if isinstance(head, (int, np.integer)) and not isinstance(head, bool):
        return int_column("head", np.full(n, int(head), np.int32), "<i4", stats=True)
    return int_column("head", _ints("head", head, n, "<i4"), "<i4", stats=True)


def activation_file(keys: KeyColumns, head: Column, act: np.ndarray, dtype: str) -> list[bytes | memoryview]:
    """The pieces of one activation file (write them in order); ``act`` is ``[n, d]``, stored as ``dtype``."""
    stored = codec.act_array(act, dtype)
    if stored.shape[0] != keys.n:
        raise StoreError(f"act has {stored.shape[0]} rows, expected {keys.n} (one per prompt_id)")
    if head.n_rows != keys.n:
        raise StoreError(f"head has {head.n_rows} rows, expected {keys.n}")
    d = stored.shape[1]
    meta = {codec.META_DTYPE: dtype.encode(), codec.META_DIM: str(d).encode()}
    row_bytes = stored.itemsize * d + 24
    group_rows = max(1024, ROW_GROUP_BYTES // row_bytes)
    return encode_file([*keys.columns, head, fixed_column("act", stored)], group_rows, meta)


def activation_schema(dtype: str, d: int) -> pa.Schema:
    """The Arrow schema a reader sees in every file :func:`activation_file` writes with ``dtype`` and
    width ``d`` (the columns above, in that order; ``act`` holds ``d`` values of ``dtype`` per row)."""
    width = np.dtype(codec.check_dtype(dtype)).itemsize * d
    return pa.schema(
        [
            ("prompt_id", pa.int64()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("token", pa.string()),
            ("head", pa.int32()),
            ("act", pa.binary(width)),
        ]
    )


def _ints(name: str, values: Any, n: int, dtype: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise StoreError(f"{name} must have shape [{n}], got {list(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise StoreError(f"{name} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _tokens(token: Sequence[str] | pa.Array, n: int) -> pa.Array:
    if isinstance(token, pa.ChunkedArray):
        token = token.combine_chunks()
    if len(token) != n:
        raise StoreError(f"token has {len(token)} entries, expected {n}")
    if isinstance(token, pa.Array):
        if not (pa.types.is_string(token.type) or pa.types.is_large_string(token.type)):
            raise StoreError(f"token must be strings, got an Arrow array of {token.type}")
        return token
    try:
        return pa.array(token, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"token must be a sequence of strings: {exc}") from None


# -- pages and the file -----------------------------------------------------------------------------


class _Parts:
    """The file's pieces: small encoded bytes coalesced, large value slices kept as views."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self._small = bytearray()
        self.size = 0

    def add(self, piece: bytes | memoryview) -> None:
        if len(piece) < _INLINE:
            self._small += piece
        else:
            if self._small:
                self.parts.append(bytes(self._small))
                self._small = bytearray()
            self.parts.append(piece)
        self.size += len(piece)

    def done(self) -> list[bytes | memoryview]:
        if self._small:
            self.parts.append(bytes(self._small))
        return self.parts


@lru_cache(maxsize=256)
def _page_header(num_values: int, size: int) -> bytes:
    """A v1 data page's header (PLAIN values, RLE levels, uncompressed); most pages of a file share one."""
    data_header = thrift_struct((1, I32, num_values), (2, I32, _PLAIN), (3, I32, _RLE), (4, I32, _RLE))
    return thrift_struct((1, I32, _DATA_PAGE), (2, I32, size), (3, I32, size), (5, STRUCT, data_header))


@lru_cache(maxsize=256)
def _all_valid_levels(count: int) -> bytes:
    return _levels(np.ones(count, bool))


def _levels(valid: np.ndarray) -> bytes:
    """Definition levels (max level 1) of one page's rows: RLE/bit-packed hybrid with a length prefix."""
    count = len(valid)
    if valid.all():
        body = _varint(count << 1) + b"\x01"
    elif not valid.any():
        body = _varint(count << 1) + b"\x00"
    else:  # one bit-packed run: groups of 8 levels, one bit each, little-endian bit order
        body = _varint(((count + 7) // 8) << 1 | 1) + np.packbits(valid, bitorder="little").tobytes()
    return len(body).to_bytes(4, "little") + body


def _page_rows(col: Column, start: int, stop: int) -> list[int]:
    """Row boundaries of the column's pages within rows [start, stop): values of ~PAGE_BYTES each."""
    if col.offsets is None:
        step = max(1, PAGE_BYTES // max(col.width, 1))
        return [*range(start, stop, step), stop]
    if col.valid is None and col.offsets[stop] - col.offsets[start] <= PAGE_BYTES:
        return [start, stop]
    rows = np.arange(start, stop + 1)
    value_of_row = rows if col.valid is None else np.concatenate(([0], np.cumsum(col.valid)))[rows]
    byte_of_row = col.offsets[value_of_row]
    targets = byte_of_row[0] + PAGE_BYTES * np.arange(1, (byte_of_row[-1] - byte_of_row[0]) // PAGE_BYTES + 1)
    cuts = np.unique(np.searchsorted(byte_of_row, targets, side="right") - 1)
    inner = [start + int(c) for c in cuts if 0 < c < stop - start]
    return [start, *inner, stop]


def _statistics(col: Column, v0: int, v1: int, rows: int) -> bytes | None:
    if col.stats is None:
        return None
    values = col.stats[v0:v1]
    nulls = rows - (v1 - v0)
    if not len(values):
        return thrift_struct((3, I64, nulls))
    lo, hi = values.min(), values.max()

    def enc(v: object) -> bytes:  # PLAIN encoding of one value
        return np.array(v, values.dtype).tobytes()

    # signed ints: the deprecated min/max (1, 2) mean the same as min_value/max_value (6, 5); older readers
    # know only those, so both are written (as parquet-cpp does)
    return thrift_struct(
        (1, BINARY, enc(hi)),
        (2, BINARY, enc(lo)),
        (3, I64, nulls),
        (5, BINARY, enc(hi)),
        (6, BINARY, enc(lo)),
        (7, BOOL, True),
        (8, BOOL, True),
    )


def _column_chunk(out: _Parts, col: Column, start: int, stop: int) -> bytes:
    """Write the pages of rows [start, stop) of ``col``; return its encoded ColumnChunk."""
    first = out.size
    bounds = _page_rows(col, start, stop)
    v_start = col.value_index(start)
    v = v_start
    for a, b in zip(bounds[:-1], bounds[1:]):
        v_next = v + (b - a) if col.valid is None else v + int(np.count_nonzero(col.valid[a:b]))
        levels = _all_valid_levels(b - a) if col.valid is None else _levels(col.valid[a:b])
        lo, hi = col.byte_at(v), col.byte_at(v_next)
        out.add(_page_header(b - a, len(levels) + hi - lo) + levels)
        if hi > lo:
            # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
            out.add(memoryview(col.data[lo:hi]))  # type: ignore[arg-type]
        v = v_next
    total = out.size - first
    meta = thrift_struct(
        (1, I32, col.physical),
        (2, LIST, _ENCODINGS),
        (3, LIST, _path(col.name)),
        (4, I32, _UNCOMPRESSED),
        (5, I64, stop - start),
        (6, I64, total),
        (7, I64, total),
        (9, I64, first),
        (12, STRUCT, _statistics(col, v_start, v, stop - start)),
    )
    return thrift_struct((2, I64, 0), (3, STRUCT, meta))


_ENCODINGS = thrift_list(I32, [_PLAIN, _RLE])  # of every column chunk: PLAIN values, RLE levels


@lru_cache(maxsize=64)
def _path(name: str) -> bytes:
    return thrift_list(BINARY, [name])


@lru_cache(maxsize=64)
def _schema(columns: tuple[tuple[str, int, int, bool], ...]) -> bytes:
    """The encoded schema list of columns (name, physical type, width, is string); the same for many files."""
    root = thrift_struct((3, I32, _REQUIRED), (4, BINARY, "schema"), (5, I32, len(columns)))
    elements = [root]
    for name, physical, width, is_string in columns:
        string = is_string or None
        elements.append(
            thrift_struct(
                (1, I32, physical),
                (2, I32, width if physical == FIXED_LEN_BYTE_ARRAY else None),
                (3, I32, _OPTIONAL),
                (4, BINARY, name),
                (6, I32, _UTF8 if string else None),
                (10, STRUCT, thrift_struct((1, STRUCT, thrift_struct())) if string else None),  # LogicalType STRING
            )
        )
    return thrift_list(STRUCT, elements)


@lru_cache(maxsize=64)
def _column_orders(count: int) -> bytes:
    return thrift_list(STRUCT, [thrift_struct((1, STRUCT, thrift_struct()))] * count)  # TYPE_ORDER each


def encode_file(columns: Sequence[Column], group_rows: int, metadata: dict[bytes, bytes]) -> list[bytes | memoryview]:
    """A whole Parquet file as pieces to write in order: ``columns`` in row groups of ``group_rows`` rows."""
    n = columns[0].n_rows
    if any(c.n_rows != n for c in columns):
        raise StoreError(f"columns disagree on the row count: {[(c.name, c.n_rows) for c in columns]}")
    if group_rows < 1:
        raise StoreError(f"group_rows must be positive, got {group_rows}")
    out = _Parts()
    out.add(MAGIC)
    groups = []
    for ordinal, start in enumerate(range(0, n, group_rows)):
        stop = min(n, start + group_rows)
        offset = out.size
        chunks = [_column_chunk(out, col, start, stop) for col in columns]
        size = out.size - offset
        groups.append(
            thrift_struct(
                (1, LIST, (STRUCT, chunks)),
                (2, I64, size),
                (3, I64, stop - start),
                (5, I64, offset),
                (6, I64, size),
                (7, I16, ordinal),
            )
        )
    key_values = [thrift_struct((1, BINARY, k), (2, BINARY, v)) for k, v in metadata.items()]
    footer = thrift_struct(
        (1, I32, _FORMAT_VERSION),
        (2, LIST, _schema(tuple((c.name, c.physical, c.width, c.string) for c in columns))),
        (3, I64, n),
        (4, LIST, (STRUCT, groups)),
        (5, LIST, (STRUCT, key_values)),
        (6, BINARY, CREATED_BY),
        (7, LIST, _column_orders(len(columns))),
    )
    out.add(footer + len(footer).to_bytes(4, "little") + MAGIC)
    return out.done()
