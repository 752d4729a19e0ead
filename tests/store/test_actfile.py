"""Our own activation Parquet writer (``interplab.store.actfile``), checked against pyarrow and DuckDB.

Every file is real and is read back by both pyarrow's and DuckDB's Parquet readers; the schema is
compared with the file pyarrow itself writes for the same rows (the layout the store used before).
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interplab.store import StoreError, actfile, codec, fs

TOKENS = ["tok", "", "é", "日本語", "a b", "🙂x", "<s>"]


def _rows(n: int, d: int, dtype: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "prompt_id": np.arange(n, dtype=np.int64) // 3 + 1000,
        "position": (np.arange(n) % 3 + 2).astype(np.int32),
        "token_id": rng.integers(0, 50_000, n),
        "token": [TOKENS[i % len(TOKENS)] + ("" if i % 4 else str(i)) for i in range(n)],
        "act": rng.standard_normal((n, d)).astype(dtype),
    }


def _head_values(head, n: int) -> list:
    if head is None:
        return [None] * n
    if isinstance(head, int):
        return [head] * n
    return [int(h) for h in head]


def _write(store, rows: dict, head, dtype: str) -> str:
    w = store.begin_run("capture", model="tiny", spec={})
    entry = w.write_activations(0, "resid_pre", 2, head, rows["prompt_id"], rows["position"], rows["token_id"],
                                rows["token"], rows["act"], dtype=dtype)
    path = store.location.path(entry.path)
    assert entry.bytes == os.path.getsize(path)
    return path


def _reference(path: str, rows: dict, head, dtype: str) -> None:
    """The same rows written by pyarrow's Parquet writer, as the store did before actfile."""
    n = len(rows["prompt_id"])
    d = rows["act"].shape[1]
    table = pa.table({
        "prompt_id": pa.array(rows["prompt_id"], pa.int64()),
        "position": pa.array(rows["position"], pa.int32()),
        "token_id": pa.array(np.asarray(rows["token_id"], np.int32)),
        "token": pa.array(rows["token"], pa.string()),
        "head": pa.array(_head_values(head, n), pa.int32()),
        "act": codec.encode_act(rows["act"], dtype),
    }).replace_schema_metadata({codec.META_DTYPE: dtype.encode(), codec.META_DIM: str(d).encode()})
    pq.write_table(table, path, compression="NONE", use_dictionary=["token"],
                   write_statistics=["prompt_id", "position", "head"], column_encoding={"act": "PLAIN"})


def _act_bytes(values, width: int) -> bytes:
    """The concatenated value bytes of a fixed-size binary (pyarrow) or binary (DuckDB BLOB) column."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_fixed_size_binary(arr.type):
        return bytes(memoryview(arr.buffers()[1])[arr.offset * width : (arr.offset + len(arr)) * width])
    return b"".join(arr.to_pylist())


def _check_table(table: pa.Table, rows: dict, head, dtype: str) -> None:
    n = len(rows["prompt_id"])
    assert table.num_rows == n
    assert table.column("prompt_id").to_pylist() == rows["prompt_id"].tolist()
    assert table.column("position").to_pylist() == rows["position"].tolist()
    assert table.column("token_id").to_pylist() == np.asarray(rows["token_id"], np.int32).tolist()
    assert table.column("token").to_pylist() == list(rows["token"])
    assert table.column("head").to_pylist() == _head_values(head, n)
    stored = np.ascontiguousarray(rows["act"], dtype=dtype)
    assert _act_bytes(table.column("act"), stored.itemsize * stored.shape[1]) == stored.tobytes()


def _duckdb(path: str) -> pa.Table:
    with duckdb.connect() as con:
        sql = f"SELECT * EXCLUDE (file_row_number) FROM read_parquet('{path}', file_row_number = true, hive_partitioning = false) ORDER BY file_row_number"
        result = con.sql(sql).arrow()
        return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


HEADS = {"none": None, "int": 3, "array": "array"}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("d", [576, 5])
@pytest.mark.parametrize("n", [1, 2500])
@pytest.mark.parametrize("head_kind", list(HEADS))
def test_read_back_by_pyarrow_and_duckdb(store, tmp_path, monkeypatch, dtype, d, n, head_kind):
    monkeypatch.setattr(actfile, "ROW_GROUP_BYTES", 1)  # row groups of 1024 rows (the minimum)
    monkeypatch.setattr(actfile, "PAGE_BYTES", 4096)  # several pages per column chunk, act and small columns
    rows = _rows(n, d, dtype)
    head = np.arange(n, dtype=np.int64) % 9 if head_kind == "array" else HEADS[head_kind]
    path = _write(store, rows, head, dtype)

    _check_table(pq.read_table(path), rows, head, dtype)
    _check_table(_duckdb(path), rows, head, dtype)

    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == -(-n // 1024)
    assert meta.metadata[codec.META_DTYPE] == dtype.encode() and meta.metadata[codec.META_DIM] == str(d).encode()
    if n > 1024:  # the act column of a full row group is cut into pages of ~PAGE_BYTES
        assert meta.row_group(0).column(5).total_uncompressed_size > 1024 * rows["act"][0].nbytes

    ref = str(tmp_path / "reference.parquet")
    _reference(ref, rows, head, dtype)
    assert pq.read_table(path).schema.equals(pq.read_table(ref).schema, check_metadata=True)
    assert pq.ParquetFile(path).schema.equals(pq.ParquetFile(ref).schema)
    assert _duckdb(path).schema.equals(_duckdb(ref).schema)


@pytest.mark.parametrize("head", [None, 4, "array"])
def test_statistics(store, monkeypatch, head):
    monkeypatch.setattr(actfile, "ROW_GROUP_BYTES", 64 << 10)
    n = 3000
    rows = _rows(n, 16, "float32", seed=1)
    rows["prompt_id"] = np.random.default_rng(2).integers(-5, 10**12, n)  # unsorted, negative, wide
    if head == "array":
        head = np.random.default_rng(3).integers(0, 12, n)
    path = _write(store, rows, head, "float32")
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        lo, hi = g * 1024, min(n, (g + 1) * 1024)
        assert group.num_rows == hi - lo
        for i, name in enumerate(("prompt_id", "position")):
            stats = group.column(i).statistics
            assert (stats.min, stats.max, stats.null_count) == (rows[name][lo:hi].min(), rows[name][lo:hi].max(), 0)
        assert not group.column(2).is_stats_set and not group.column(3).is_stats_set and not group.column(5).is_stats_set
        stats = group.column(4).statistics
        if head is None:
            assert (stats.has_min_max, stats.null_count) == (False, hi - lo)
        else:
            values = np.broadcast_to(head, n)[lo:hi]
            assert (stats.min, stats.max, stats.null_count) == (values.min(), values.max(), 0)
    with duckdb.connect() as con:
        got = con.sql(f"SELECT stats_min_value, stats_max_value FROM parquet_metadata('{path}') WHERE path_in_schema = 'prompt_id' "
                      "ORDER BY row_group_id").fetchall()
    assert got == [(str(rows["prompt_id"][g * 1024:(g + 1) * 1024].min()), str(rows["prompt_id"][g * 1024:(g + 1) * 1024].max()))
                   for g in range(3)]


def test_row_groups_at_the_real_size(store):
    """With the real 64 MiB row-group target: rows of d=4096 float16 (8 KiB) → 8168 rows per group."""
    n = 8168 + 100
    rows = _rows(n, 4096, "float16", seed=4)
    path = _write(store, rows, None, "float16")
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [8168, 100]
    act = meta.row_group(0).column(5)
    assert act.total_uncompressed_size == act.total_compressed_size > 8168 * 8192
    _check_table(pq.read_table(path), rows, None, "float16")
    with duckdb.connect() as con:
        assert con.sql(f"SELECT count(*), sum(octet_length(act)) FROM read_parquet('{path}')").fetchall() == [(n, n * 8192)]


def test_many_row_groups_and_empty_file(store, monkeypatch):
    monkeypatch.setattr(actfile, "ROW_GROUP_BYTES", 1)
    rows = _rows(20 * 1024, 2, "float16", seed=5)  # 20 row groups: the footer's long list form (≥ 15 items)
    path = _write(store, rows, 1, "float16")
    assert pq.ParquetFile(path).metadata.num_row_groups == 20
    _check_table(pq.read_table(path), rows, 1, "float16")
    _check_table(_duckdb(path), rows, 1, "float16")

    empty = _rows(0, 8, "float32")
    path = _write(store, empty, None, "float32")
    assert pq.read_table(path).num_rows == 0 and len(_duckdb(path)) == 0
    assert pq.read_table(path).schema.field("act").type == pa.binary(32)


def _write_columns(tmp_path, columns, group_rows: int) -> str:
    loc = fs.resolve(str(tmp_path / "raw"))
    path = loc.path("cols.parquet")
    parts = actfile.encode_file(columns, group_rows, {b"k": b"v"})
    assert fs.write_parts(loc, path, parts) == os.path.getsize(path)
    return path


def test_mixed_nulls(tmp_path, monkeypatch):
    """Definition levels for a general null mask (bit-packed runs), ints and strings, across pages."""
    monkeypatch.setattr(actfile, "PAGE_BYTES", 64)
    rng = np.random.default_rng(6)
    n = 1000
    valid = rng.random(n) < 0.6
    valid[:50], valid[100:150] = False, True  # all-null and all-valid pages too
    ints = rng.integers(-100, 100, n).astype(np.int32)
    strings = [TOKENS[i % len(TOKENS)] if v else None for i, v in enumerate(valid)]
    nullable = actfile.Column("head", actfile.INT32, ints[valid].view(np.uint8), n, width=4, valid=valid,
                              stats=ints[valid])
    path = _write_columns(tmp_path, [nullable, actfile.string_column("token", pa.array(strings, pa.string()))], 300)
    expected_ints = [int(x) if v else None for x, v in zip(ints, valid)]
    for table in (pq.read_table(path), _duckdb(path)):
        assert table.column("head").to_pylist() == expected_ints
        assert table.column("token").to_pylist() == strings
    meta = pq.ParquetFile(path).metadata
    for g in range(4):
        stats, part = meta.row_group(g).column(0).statistics, slice(g * 300, (g + 1) * 300)
        assert (stats.min, stats.max, stats.null_count) == (ints[part][valid[part]].min(), ints[part][valid[part]].max(),
                                                            int((~valid[part]).sum()))


def test_partial_writes_are_resumed(tmp_path, monkeypatch):
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [memoryview(b"".join(bytes(b) for b in bufs))[:777]]))
    rows = _rows(300, 7, "float16", seed=7)
    keys = actfile.KeyColumns.build(rows["prompt_id"], rows["position"], rows["token_id"], rows["token"])
    parts = actfile.activation_file(keys, actfile.head_column(None, 300), rows["act"], "float16")
    loc = fs.resolve(str(tmp_path / "raw"))
    fs.write_parts(loc, loc.path("a.parquet"), parts)
    _check_table(pq.read_table(loc.path("a.parquet")), rows, None, "float16")


def test_keys_repeat_matches_a_direct_build():
    rows = _rows(5, 2, "float16")
    keys = actfile.KeyColumns.build(rows["prompt_id"], rows["position"], rows["token_id"], pa.array(rows["token"]))
    repeated = keys.repeat(3)
    direct = actfile.KeyColumns.build(np.repeat(rows["prompt_id"], 3), np.repeat(rows["position"], 3),
                                      np.repeat(rows["token_id"], 3), [t for t in rows["token"] for _ in range(3)])
    for a, b in zip(repeated.columns, direct.columns):
        assert a.data.tobytes() == b.data.tobytes() and a.n_rows == b.n_rows == 15


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"token": ["a"]}, "token has 1 entries"),
        ({"token": [1, 2, 3]}, "strings"),
        ({"position": np.zeros(2, np.int32)}, "position must have shape"),
        ({"token_id": np.zeros(3)}, "token_id must be integers"),
        ({"act": np.zeros((2, 4), np.float32)}, "act has 2 rows"),
        ({"act": np.zeros((3, 4), np.int32)}, "float"),
    ],
)
def test_bad_input_is_refused(store, change, match):
    rows = {**_rows(3, 4, "float32"), **change}
    w = store.begin_run("capture", model="tiny", spec={})
    with pytest.raises(StoreError, match=match):
        _write(store, rows, None, "float32")
    assert not w.written_chunks()


@pytest.mark.parametrize(
    "values",
    [pa.array(["ab", "", "日本", None, "x" * 300]), pa.array(["ab", "c", "de", "f"]).slice(1, 2),
     pa.array(["q", None], pa.large_string()), pa.array([], pa.string()), pa.array([None, None], pa.string())],
    ids=["mixed", "sliced", "large", "empty", "all-null"],
)
def test_string_column_is_plain_byte_array(values):
    col = actfile.string_column("token", values)
    present = [v.encode() for v in values.to_pylist() if v is not None]
    assert col.data.tobytes() == b"".join(len(v).to_bytes(4, "little") + v for v in present)
    assert col.offsets.tolist() == np.cumsum([0] + [4 + len(v) for v in present]).tolist()
    assert col.n_rows == len(values)
