"""One neuron or one direction over every activation row of a site: a read path that skips SQL.

The ``activations`` view decodes every row's ``act`` into a ``FLOAT[d]`` list before anything can
be computed on it (a Python UDF per batch, then DuckDB's list functions), so scoring 1 M rows of
d = 576 moves ~2.3 GB of float32 through DuckDB. Here only the run's own files of that
(site, layer) are read, as the commit manifest lists them, one Parquet row group at a time with
pyarrow, on a thread per core. The ``act`` column (``FIXED_LEN_BYTE_ARRAY``, see
:mod:`interplab.store.codec`) is viewed in place as ``dtype[n, d]`` with numpy: a neuron is one
strided column of it, a direction a float32 matrix-vector product over cache-sized blocks
(float16 converted block by block with torch). Only the scores (and each row's prompt id and
position) are kept, so memory is one row group per thread plus ~20 bytes per row.

Rows are those the ``activations`` view shows for the run: committed files only, files the run
reuses from another run (``source_run``) under the run's own prompt ids
(:func:`interplab.store.reuse.read_activation_file`), and with ``head`` given only that head's rows.
The tokens of chosen rows are read afterwards, from just the row groups that hold them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from interplab.store import codec, layout, reuse
from interplab.store.errors import StoreError
from interplab.store.fs import Location
from interplab.store.manifest import FileEntry, RunInfo

BLOCK_ROWS = 512  # rows converted to float32 at a time for a direction: stays in the core's cache
_KEYS = ["prompt_id", "position", "head"]


@dataclass(frozen=True)
class Part:
    """One unit of reading: a row group of a file of the run (``group`` None: the whole file, for a
    file the run reuses from another run, whose rows are remapped as a whole)."""

    entry: FileEntry
    group: int | None


@dataclass(frozen=True)
class Scores:
    """Every row's score, in file order. ``part``/``row`` say where each row is read from
    (:func:`tokens` uses them)."""

    d: int
    prompt_id: np.ndarray  # int64[n]
    position: np.ndarray  # int32[n]
    score: np.ndarray  # float32[n]
    part: np.ndarray  # int32[n]: index into ``parts``
    row: np.ndarray  # int64[n]: row within that part as read (before the head filter)
    parts: tuple[Part, ...]
    run: RunInfo

    def __len__(self) -> int:
        return len(self.score)


def site_files(info: RunInfo, site: str, layer: int | None, head: int | None = None) -> list[FileEntry]:
    """The committed activation files of ``info`` at (``site``, ``layer``) (and ``head``, where given)."""
    if info.status != "committed":
        return []
    return [
        e
        for e in info.files
        if e.table == layout.ACTIVATIONS and e.site == site and e.layer == layer and (head is None or e.head in (None, head))
    ]


def score_rows(
    location: Location,
    info: RunInfo,
    site: str,
    layer: int | None,
    head: int | None = None,
    *,
    neuron: int | None = None,
    direction: Sequence[float] | np.ndarray | None = None,
    threads: int | None = None,
) -> Scores:
    """Score every activation row of run ``info`` at (``site``, ``layer``[, ``head``]): ``act[neuron]``,
    or ``act · direction`` (float32). Exactly one of ``neuron`` and ``direction``."""
    if (neuron is None) == (direction is None):
        raise StoreError("give exactly one of 'neuron' (an index) and 'direction' (a vector)")
    entries = site_files(info, site, layer, head)
    where = f"{site}.{layer}" + ("" if head is None else f" head {head}")
    if not entries:
        raise StoreError(f"run {info.run_id!r} has no activations at {where}")
    widths = {(e.dtype or "float16", e.d) for e in entries}
    if len(widths) != 1 or None in {w[1] for w in widths}:
        raise StoreError(f"run {info.run_id!r} at {where}: files of widths/dtypes {sorted(map(str, widths))}; pick a head")
    dtype, d_raw = widths.pop()
    d = int(d_raw or 0)
    vector: np.ndarray | None = None
    if neuron is not None:
        if not 0 <= neuron < d:
            raise StoreError(f"neuron={neuron}: this site has {d} neurons (0..{d - 1})")
    else:
        vector = np.asarray(direction, dtype=np.float32).reshape(-1)
        if len(vector) != d:
            raise StoreError(f"direction: {len(vector)} numbers, but this site's vectors have {d}")
    parts = _parts(location, entries)

    def work(i: int) -> tuple[np.ndarray, ...]:
        table = _read(location, info, parts[i], ["act", *_KEYS])
        keep = _head_mask(table["head"], head)
        act = _act_rows(table["act"], dtype, d)
        score = act[:, neuron].astype(np.float32) if neuron is not None else _matvec(act, vector)
        pid = np.asarray(table["prompt_id"].to_numpy(zero_copy_only=False), np.int64)
        pos = np.asarray(table["position"].to_numpy(zero_copy_only=False), np.int32)
        rows = np.arange(len(score), dtype=np.int64)
        if keep is not None:
            score, pid, pos, rows = score[keep], pid[keep], pos[keep], rows[keep]
        return pid, pos, score, np.full(len(score), i, np.int32), rows

    n_threads = max(1, min(threads or os.cpu_count() or 1, len(parts)))
    if n_threads == 1:
        done = [work(i) for i in range(len(parts))]
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            done = list(pool.map(work, range(len(parts))))
    cols = [np.concatenate([p[c] for p in done]) for c in range(5)]
    return Scores(d, cols[0], cols[1], cols[2], cols[3], cols[4], tuple(parts), info)


def top_prompts(scores: Scores, k: int, candidates: int | None = None) -> np.ndarray:
    """Indices (into ``scores``) of the ``k`` prompts with the largest score, each at its strongest
    row: ranked by (score descending, prompt id, position), the same order the browser's SQL gives.

    The ``candidates`` (default ``10 * k``) best rows, with every row tied with the last of them,
    are ranked first; when they hold fewer than ``k`` prompts every row is ranked."""
    n = len(scores)
    if n == 0 or k <= 0:
        return np.zeros(0, np.int64)
    m = min(n, candidates or 10 * k)
    if m < n:
        threshold = np.partition(scores.score, n - m)[n - m]
        pool = np.flatnonzero(scores.score >= threshold)
        best = _best_per_prompt(scores, pool)
        if len(best) >= k:
            return best[:k]
    return _best_per_prompt(scores, np.arange(n))[:k]


def _best_per_prompt(scores: Scores, rows: np.ndarray) -> np.ndarray:
    """Of ``rows``, each prompt's best row (largest score, then smallest position), ranked."""
    pid, pos, score = scores.prompt_id[rows], scores.position[rows], scores.score[rows]
    order = np.lexsort((pos, -score, pid))
    first = np.ones(len(order), bool)
    first[1:] = pid[order][1:] != pid[order][:-1]
    best = order[first]
    ranked = best[np.lexsort((pos[best], pid[best], -score[best]))]
    out: np.ndarray = rows[ranked]
    return out


def tokens(location: Location, scores: Scores, rows: np.ndarray) -> list[str | None]:
    """The captured ``token`` of each of ``rows`` (indices into ``scores``), reading only their row groups."""
    out: list[str | None] = [None] * len(rows)
    parts = scores.part[rows]
    for i in np.unique(parts).tolist():
        mine = np.flatnonzero(parts == i)
        column = _read(location, scores.run, scores.parts[i], ["token"])["token"]
        picked = column.take(pa.array(scores.row[rows[mine]], pa.int64())).to_pylist()
        for j, value in zip(mine.tolist(), picked):
            out[j] = value
    return out


# -- reading --------------------------------------------------------------------------------------


def _parts(location: Location, entries: list[FileEntry]) -> list[Part]:
    parts: list[Part] = []
    for entry in entries:
        if entry.source_run is not None:
            parts.append(Part(entry, None))
            continue
        with location.fs.open_input_file(location.path(entry.path)) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        parts.extend(Part(entry, g) for g in range(groups))
    return parts


def _read(location: Location, info: RunInfo, part: Part, columns: list[str]) -> pa.Table:
    if part.group is None:
        return reuse.read_activation_file(location, info, part.entry, columns)
    with location.fs.open_input_file(location.path(part.entry.path)) as f:
        return pq.ParquetFile(f).read_row_group(part.group, columns=columns, use_threads=False)


def _head_mask(heads: pa.ChunkedArray, head: int | None) -> np.ndarray | None:
    if head is None:
        return None
    mask: np.ndarray = pc.fill_null(pc.equal(heads, head), False).to_numpy(zero_copy_only=False)
    return mask


def _act_rows(values: pa.ChunkedArray, dtype: str, d: int) -> np.ndarray:
    """The stored vectors as ``dtype[n, d]``, a view of the Arrow buffer where there is one chunk."""
    stored = np.dtype(dtype).newbyteorder("<")
    width = stored.itemsize * d
    chunks: list[np.ndarray] = []
    for chunk in values.chunks:
        if chunk.null_count:
            raise StoreError("act values contain NULLs")
        if pa.types.is_fixed_size_binary(chunk.type) and chunk.type.byte_width == width:
            flat = np.frombuffer(chunk.buffers()[1], dtype=stored, count=(chunk.offset + len(chunk)) * d)
            chunks.append(flat[chunk.offset * d :].reshape(len(chunk), d))
        else:  # variable-length binary (another writer's files): decode the general way
            chunks.append(codec.decode_act(chunk, dtype, d))
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros((0, d), stored)


def _matvec(act: np.ndarray, vector: Any) -> np.ndarray:
    """``act @ vector`` in float32. ``float16`` rows are converted ``BLOCK_ROWS`` at a time (no
    float32 copy of them all) by torch, whose vectorised conversion is ~8x numpy's (imported here
    only: the store does not import torch otherwise)."""
    n, d = act.shape
    out = np.empty(n, np.float32)
    if act.dtype == np.float32:
        np.matmul(act, vector, out=out)
        return out
    import torch

    rows = min(BLOCK_ROWS, n)
    staging = np.empty((rows, d), act.dtype)  # a writable copy of each block for torch to read
    half, block = torch.from_numpy(staging), torch.empty((rows, d), dtype=torch.float32)
    weights, result = torch.from_numpy(np.ascontiguousarray(vector, np.float32)), torch.from_numpy(out)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        np.copyto(staging[: stop - start], act[start:stop])
        block[: stop - start].copy_(half[: stop - start])
        torch.mv(block[: stop - start], weights, out=result[start:stop])
    return out
