"""Query latency of the store on 2 cores: a partition-pruned filter over >= 10M rows, and a cosine
top-k over 1M x 576 vectors (goal <= 2 s).

    python bench/store_query.py [--rows 10000000] [--vectors 1000000] [--dir /tmp]

Baselines measured in the same run: the same aggregate without the partition filter (full scan),
and a numpy brute-force cosine top-k over the same vectors already in memory as float32.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from interplab.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_of  # noqa: E402

RUNS, SITES, LAYERS = 5, ("resid_pre", "resid_post"), 4


def build(store, rows: int, vectors: int, chunk_rows: int = 50_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    per_part = rows // (RUNS * len(SITES) * LAYERS)
    base = rng.standard_normal((chunk_rows, 64), dtype=np.float32).astype(np.float16)
    position = (np.arange(chunk_rows) % 128).astype(np.int32)
    token_id = rng.integers(0, 49152, chunk_rows)
    token = [f"tok{i % 5000}" for i in range(chunk_rows)]
    for r in range(RUNS):
        w = store.begin_run("capture", model="bench", spec={}, run_id=f"q-{r}")
        chunk = 0
        for start in range(0, per_part, chunk_rows):
            n = min(chunk_rows, per_part - start)
            pid = np.arange(start, start + n, dtype=np.int64) // 128
            for site in SITES:
                for layer in range(LAYERS):
                    w.write_activations(chunk, site, layer, None, pid, position[:n], token_id[:n], token[:n], base[:n])
            chunk += 1
        w.commit()
    vecs = rng.standard_normal((vectors, 576), dtype=np.float32).astype(np.float16)
    for run_id, dtype in (("cos", "float16"), ("cos32", "float32")):
        w = store.begin_run("capture", model="bench", spec={}, run_id=run_id)
        for chunk, start in enumerate(range(0, vectors, 100_000)):
            part = vecs[start : start + 100_000]
            n = len(part)
            pid = np.arange(start, start + n, dtype=np.int64)
            w.write_activations(
                chunk, "resid_post", 20, None, pid, np.zeros(n, np.int32), np.zeros(n, np.int64), ["t"] * n, part, dtype=dtype
            )
        w.commit()
    return vecs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="interplab-qbench-", dir=args.dir)
    try:
        store = open_store(f"{root}/store")
        start = time.perf_counter()
        vecs = build(store, args.rows, args.vectors)
        print(
            f"built store: {args.rows:,} rows (d=64) + {args.vectors:,} vectors (d=576, float16 and float32) in {time.perf_counter() - start:.1f} s"
        )
        start = time.perf_counter()
        total = store.sql("SELECT count(*) FROM activations").column(0)[0].as_py()
        print(f"cold session (list manifests, create views) + count(*) over {total:,} rows: {time.perf_counter() - start:.3f} s")

        pruned_q = (
            "SELECT count(*) AS n, avg(act[1]) AS a FROM activations WHERE run_id = 'q-2' AND site = 'resid_pre' AND layer = 1"
        )
        full_q = "SELECT count(*) AS n, avg(act[1]) AS a FROM activations WHERE run_id LIKE 'q-%'"
        t_pruned, r = best_of(lambda: store.sql(pruned_q))
        t_full, r_full = best_of(lambda: store.sql(full_q), rounds=1)
        print(
            f"partition-pruned filter ({r.column('n')[0].as_py():,} of {r_full.column('n')[0].as_py():,} rows): "
            f"{t_pruned:.3f} s; same aggregate, full scan: {t_full:.3f} s; ratio {t_full / t_pruned:.0f}x"
        )

        query = vecs[123].astype(np.float32)
        cos_q = (
            "SELECT prompt_id, array_cosine_similarity(act, $v::FLOAT[576]) AS s FROM activations_d576 "
            "WHERE run_id = 'cos' ORDER BY s DESC LIMIT 10"
        )
        t_cos, top = best_of(lambda: store.sql(cos_q, {"v": query.tolist()}))
        assert top.column("prompt_id")[0].as_py() == 123
        t_cos32, top = best_of(lambda: store.sql(cos_q.replace("'cos'", "'cos32'"), {"v": query.tolist()}))
        assert top.column("prompt_id")[0].as_py() == 123
        t_saved, _ = best_of(lambda: store.saved("nearest", run_id="cos", site="resid_post", layer=20, vector=query, k=10))
        mat = vecs.astype(np.float32)

        def numpy_topk():
            sims = (mat @ query) / (np.linalg.norm(mat, axis=1) * np.linalg.norm(query))
            return np.argpartition(-sims, 10)[:10]

        t_np, _ = best_of(numpy_topk)
        print(
            f"cosine top-10 over {len(vecs):,} x 576 (SQL, array_cosine_similarity): {t_cos:.3f} s (goal <= 2 s); "
            f"stored as float32: {t_cos32:.3f} s; saved query 'nearest': {t_saved:.3f} s; numpy in memory (float32): {t_np:.3f} s; "
            f"SQL/numpy {t_cos / t_np:.1f}x"
        )
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
