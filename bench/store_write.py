"""Activation write throughput of the store vs writing the same bytes raw to a file, in the same run.

    python bench/store_write.py [--mb 512] [--dir /tmp]

For each (dtype, d) the act payload (n x d x itemsize bytes, float16 or float32) is written in
chunks, once through ``RunWriter.write_activations`` (all columns, atomic rename, Parquet, run begun
and committed) and once as raw bytes (``f.write(memoryview(arr))`` per chunk, one file per chunk).
``store`` passes the tokens as a Python list of str (converted to Arrow on every call), ``store arrow``
as a pyarrow string array built once (what ``write_capture_chunk`` does per chunk). The naive pyarrow
path (``fixed_size_list<float>`` column, default options) is shown for reference. Throughput counts
the act payload only; ratio = store / raw (goal >= 0.8). Best of 3 rounds each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from interplab.store import open_store

SITES = 8  # sites per capture chunk in the capture-stream measurement


def _best(fn, cleanup, rounds: int = 3) -> float:
    return _best_of([fn], cleanup, rounds)[0]


def _best_of(fns, cleanup, rounds: int = 3) -> list[float]:
    """Best time of each of ``fns``, their rounds interleaved (so a change in machine load hits all alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, spent in zip(fns, times):
            cleanup()
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    cleanup()
    return [min(t) for t in times]


def bench(dtype: str, d: int, total_mb: int, root: str) -> dict:
    itemsize = np.dtype(dtype).itemsize
    rows_per_chunk = max(1024, (32 << 20) // (d * itemsize))  # ~32 MiB of act per chunk
    n_chunks = max(1, (total_mb << 20) // (rows_per_chunk * d * itemsize))
    rng = np.random.default_rng(0)
    act = rng.standard_normal((rows_per_chunk, d), dtype=np.float32).astype(dtype)
    prompt_id = np.arange(rows_per_chunk, dtype=np.int64) // 128
    position = (np.arange(rows_per_chunk) % 128).astype(np.int32)
    token_id = rng.integers(0, 49152, rows_per_chunk)
    token = [f"tok{i % 5000}" for i in range(rows_per_chunk)]
    payload = n_chunks * act.nbytes

    raw_dir = os.path.join(root, "raw")

    store_dir = os.path.join(root, "store")

    def cleanup() -> None:
        for path in (raw_dir, store_dir, os.path.join(root, "naive.parquet")):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else None
            if os.path.isfile(path):
                os.unlink(path)

    def raw() -> None:
        os.makedirs(raw_dir)
        for c in range(n_chunks):
            with open(os.path.join(raw_dir, f"chunk-{c}.bin"), "wb") as f:
                f.write(memoryview(act))

    def store(tokens) -> None:
        s = open_store(store_dir)
        w = s.begin_run("capture", model="bench", spec={})
        for c in range(n_chunks):
            w.write_activations(c, "resid_pre", 0, None, prompt_id, position, token_id, tokens, act, dtype=dtype)
        w.commit()

    def naive() -> None:
        col = pa.FixedSizeListArray.from_arrays(pa.array(act.reshape(-1)), d)
        table = pa.table({"prompt_id": prompt_id, "position": position, "token_id": token_id, "token": token, "act": col})
        for c in range(n_chunks):
            pq.write_table(table, os.path.join(root, "naive.parquet"))

    # a capture chunk of SITES sites (the engine's capture stream): written by write_capture_chunk,
    # which encodes the sites' files on parallel threads; raw = one file per site, one thread, and
    # the same with as many threads as the store uses
    import torch

    from interplab.engine.stream import CaptureChunk
    from interplab.engine.sites import Site, SiteKind
    from interplab.store.capture import WRITE_THREADS

    per_site = act[: rows_per_chunk // SITES]
    b = max(1, len(per_site) // 128)
    p = len(per_site) // b
    site_act = torch.from_numpy(np.ascontiguousarray(per_site[: b * p])).view(b, p, d)
    chunk = CaptureChunk(
        index=0, prompt_ids=list(range(b)), token_ids=torch.randint(0, 49152, (b, p)), lengths=[p] * b,
        tokens=[[f"tok{j}" for j in range(p)] for _ in range(b)], positions=torch.arange(p).expand(b, p),
        valid=torch.ones(b, p, dtype=torch.bool), acts={Site(SiteKind.RESID_POST, layer): site_act for layer in range(SITES)},
    )
    chunk_payload = n_chunks * SITES * site_act.numel() * itemsize
    site_bytes = memoryview(site_act.numpy())

    def raw_sites(threads: int):
        def run() -> None:
            os.makedirs(raw_dir)
            paths = [os.path.join(raw_dir, f"chunk-{c}-{s}.bin") for c in range(n_chunks) for s in range(SITES)]

            def one(path: str) -> None:
                with open(path, "wb") as f:
                    f.write(site_bytes)

            if threads == 1:
                for path in paths:
                    one(path)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(one, paths))
        return run

    def store_chunks() -> None:
        s = open_store(store_dir)
        w = s.begin_run("capture", model="bench", spec={})
        for c in range(n_chunks):
            w.write_capture_chunk(dataclasses.replace(chunk, index=c), dtype=dtype)
        w.commit()

    token_arrow = pa.array(token, pa.string())
    t_raw, t_store, t_store_arrow = _best_of([raw, lambda: store(token), lambda: store(token_arrow)], cleanup)
    t_naive = _best(naive, cleanup, rounds=1)
    t_raw_sites, t_raw_par, t_chunks = _best_of([raw_sites(1), raw_sites(WRITE_THREADS), store_chunks], cleanup)
    mbps = lambda t, size=payload: size / t / 1e6  # noqa: E731
    return {"dtype": dtype, "d": d, "MB": payload / 1e6, "raw": mbps(t_raw), "store": mbps(t_store),
            "store_arrow": mbps(t_store_arrow), "arrow_ratio": t_raw / t_store_arrow, "naive": mbps(t_naive),
            "ratio": t_raw / t_store, "naive_ratio": t_raw / t_naive,
            "raw_sites": mbps(t_raw_sites, chunk_payload), "raw_par": mbps(t_raw_par, chunk_payload),
            "chunks": mbps(t_chunks, chunk_payload), "threads": WRITE_THREADS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="act payload per configuration (MiB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="interplab-bench-", dir=args.dir)
    try:
        chunks = []
        print(f"{'dtype':8} {'d':>5} {'MB':>6} {'raw MB/s':>9} {'store MB/s':>11} {'ratio':>6} "
              f"{'store arrow MB/s':>17} {'ratio':>6} {'naive MB/s':>11} {'naive ratio':>11}")
        for dtype in ("float16", "float32"):
            for d in (576, 4096):
                r = bench(dtype, d, args.mb, root)
                print(f"{r['dtype']:8} {r['d']:>5} {r['MB']:>6.0f} {r['raw']:>9.0f} {r['store']:>11.0f} "
                      f"{r['ratio']:>6.2f} {r['store_arrow']:>17.0f} {r['arrow_ratio']:>6.2f} "
                      f"{r['naive']:>11.0f} {r['naive_ratio']:>11.2f}")
                chunks.append(r)
        print(f"load average: {os.getloadavg()}")
        print(f"\ncapture chunks of {SITES} sites (write_capture_chunk, {chunks[0]['threads']} writer threads) vs raw, one file per site:")
        print(f"{'dtype':8} {'d':>5} {'raw MB/s':>9} {'chunks MB/s':>12} {'ratio':>6} {'raw x threads MB/s':>19} {'ratio':>6}")
        for r in chunks:
            print(f"{r['dtype']:8} {r['d']:>5} {r['raw_sites']:>9.0f} {r['chunks']:>12.0f} {r['chunks'] / r['raw_sites']:>6.2f} "
                  f"{r['raw_par']:>19.0f} {r['chunks'] / r['raw_par']:>6.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
