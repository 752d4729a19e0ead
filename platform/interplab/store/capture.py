"""Engine capture chunks → store rows. The only store module that touches torch (imported lazily).

One :class:`~interplab.engine.stream.CaptureChunk` becomes, for each captured site, one Parquet file
of rows ``(prompt_id, position, token_id, token, head, act)`` (padding positions dropped), plus one
``prompts`` file for the chunk's prompts, and a chunk-done marker; rewriting the same chunk index
replaces all of them.

Storage dtypes: ``float16`` (default) or ``float32``. ``bfloat16`` tensors are always stored as
``float32``: widening bfloat16 to float32 is exact, while bfloat16 → float16 would lose range.

``pattern`` sites are **not stored** (a warning says so): a pattern is ``[h, p, s]`` per prompt, with
``s`` the padded key length of the batch, so its width changes from chunk to chunk and it is
quadratic in the sequence length. Analyses that need attention patterns should write their own
result table (e.g. ``write_table("attention", ...)`` in long form).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from interplab.store import actfile, codec, layout
from interplab.store.errors import StoreError
from interplab.store.manifest import FileEntry

WRITE_THREADS = min(8, os.cpu_count() or 1)  # threads encoding one chunk's site files

if TYPE_CHECKING:
    from torch import Tensor

    from interplab.engine.sites import Site
    from interplab.engine.stream import CaptureChunk
    from interplab.store.writer import RunWriter

# what every site of a chunk shares: b, p, the (row, position) of each stored row, and the row keys
# per head count (1: one row per position)
_Common = tuple[int, int, np.ndarray, np.ndarray, dict[int, actfile.KeyColumns]]


def write_capture_chunk(writer: RunWriter, chunk: CaptureChunk, dtype: str = "float16") -> list[FileEntry]:
    """Write every site of ``chunk`` (idempotent on ``(run, chunk.index)``); return the files written."""
    import torch

    codec.check_dtype(dtype)
    valid = chunk.valid.bool().cpu().numpy()
    positions = chunk.positions.long().cpu().numpy()
    b, p = valid.shape
    if len(chunk.prompt_ids) != b or positions.shape != (b, p):
        raise StoreError(f"chunk {chunk.index}: prompt_ids/positions/valid disagree on shape [b={b}, p={p}]")
    rows, cols = np.nonzero(valid)  # prompt-major, then position order
    pos = positions[rows, cols]
    prompt_id = np.asarray(chunk.prompt_ids, dtype=np.int64)[rows]
    token_ids = chunk.token_ids.long().cpu().numpy()
    token_id = token_ids[rows, pos]
    keys = {1: actfile.KeyColumns.build(prompt_id, pos, token_id, _row_tokens(chunk, rows, pos))}

    skipped = [str(site) for site in chunk.acts if not site.kind.fixed_width]
    sites = [(site, tensor) for site, tensor in chunk.acts.items() if site.kind.fixed_width]
    for site, tensor in sites:  # all-heads sites: one row per (position, head), keys built once per head count
        if tensor.dim() == 4 and site.head is None and tensor.shape[2] not in keys:
            keys[tensor.shape[2]] = keys[1].repeat(tensor.shape[2])
    common = (b, p, rows, cols, keys)

    def write(item: tuple[Site, Tensor]) -> FileEntry:
        return _write_site(writer, chunk.index, item[0], item[1], common, dtype, torch)

    def write_prompts() -> FileEntry:
        prompts = _prompts_table(chunk, token_ids)
        return writer._write_table_file(layout.PROMPTS, prompts, layout.chunk_key(chunk.index))

    # sites (and the prompts file) are independent files: encode and write them on several threads
    # (numpy, Arrow and writev release the GIL), so a chunk's write uses the machine's cores
    workers = min(len(sites) + 1, WRITE_THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="interplab-write") as pool:
            prompts_entry = pool.submit(write_prompts)
            entries = list(pool.map(write, sites))
            entries.append(prompts_entry.result())
    else:
        entries = [write(item) for item in sites] + [write_prompts()]
    if skipped:
        warnings.warn(
            f"pattern sites {skipped} are not stored (variable key length; see interplab.store.capture)",
            stacklevel=2,
        )
    writer.finish_chunk(layout.ACTIVATIONS, chunk.index, entries)
    return entries


def _write_site(
    writer: RunWriter, index: int, site: Site, tensor: Tensor, common: _Common, dtype: str, torch: ModuleType
) -> FileEntry:
    b, p, rows, cols, keys = common
    kind = site.kind.value
    store_dtype = "float32" if tensor.dtype == torch.bfloat16 else dtype
    arr = _numpy(tensor, torch)
    if arr.shape[:2] != (b, p) or arr.ndim not in (3, 4):
        raise StoreError(f"chunk {index}: site {site} has shape {list(arr.shape)}, expected [{b}, {p}, ...]")
    # [n, d] or [n, h, d]; without padding the rows are the array itself, in order (no copy)
    selected = arr.reshape(b * p, *arr.shape[2:]) if len(rows) == b * p else arr[rows, cols]
    if arr.ndim == 3:
        return writer.write_activation_rows(index, kind, site.layer, None, keys[1], selected, dtype=store_dtype)
    n, h, d = selected.shape
    if site.head is not None:
        if h != 1:
            raise StoreError(f"chunk {index}: site {site} selects one head but has {h}")
        return writer.write_activation_rows(
            index, kind, site.layer, site.head, keys[1], selected.reshape(n, d), dtype=store_dtype
        )
    head = np.tile(np.arange(h, dtype=np.int32), n)
    return writer.write_activation_rows(index, kind, site.layer, head, keys[h], selected.reshape(n * h, d), dtype=store_dtype)


def _row_tokens(chunk: CaptureChunk, rows: np.ndarray, pos: np.ndarray) -> pa.Array:
    """The token string of each stored row (prompt ``rows[i]``, position ``pos[i]``), gathered by Arrow."""
    try:
        nested = pa.array([list(t) for t in chunk.tokens], pa.list_(pa.string()))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"chunk {chunk.index}: tokens must be lists of strings: {exc}") from None
    offsets = nested.offsets.to_numpy()
    if len(nested) != len(chunk.prompt_ids) or ((pos < 0) | (pos >= np.diff(offsets)[rows])).any():
        raise StoreError(f"chunk {chunk.index}: tokens do not cover every valid position of every prompt")
    return nested.values.take(offsets[rows] + pos)


def _numpy(tensor: Tensor, torch: ModuleType) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _prompts_table(chunk: CaptureChunk, token_ids: np.ndarray) -> pa.Table:
    lengths = [int(n) for n in chunk.lengths]
    return pa.table(
        {
            "prompt_id": pa.array(chunk.prompt_ids, pa.int64()),
            "n_tokens": pa.array(lengths, pa.int32()),
            "token_ids": pa.array([token_ids[i, :n].tolist() for i, n in enumerate(lengths)], pa.list_(pa.int32())),
            "tokens": pa.array([list(t[:n]) for t, n in zip(chunk.tokens, lengths)], pa.list_(pa.string())),
        }
    )
