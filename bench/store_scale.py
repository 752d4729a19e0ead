"""A store at lab scale: 1,000 committed runs and >= 50 M activation rows, then list and query it.

    python bench/store_scale.py [--runs 1000] [--rows-per-file 5000] [--sites 2] [--layers 5] [--d 8] [--keep]

Fills a fresh store under /tmp through the store's own writer (``RunWriter.write_activation_rows``:
the Parquet files of the store's format, keys built once with numpy, float16 vectors of width d from
a small pool of random arrays), one commit manifest per run. Then measures

* listing the runs (``Store.runs()``, a fresh ``Store`` each time, and ``interplab runs list``);
* a query filtered by run, site and layer: its time, and the files DuckDB read (from
  ``EXPLAIN ANALYZE``) against the files in the store; the same query on one session with views
  over the runs it reads (the default), over every file, and over every file with
  ``union_by_name`` (what manifests without schema hashes get); the same selection made from the manifests
  (``selection_files``, what ``to_ray_dataset`` reads); and, as baselines in the same run, DuckDB's
  ``read_parquet`` over all committed files (with and without ``union_by_name``) and over only the
  selected file.

Deletes the store at the end unless ``--keep``. Default size: 1,000 runs x 2 sites x 5 layers x
5,000 rows = 50 M rows, about 2 GB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rows-per-file", type=int, default=5000)
    parser.add_argument("--sites", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    args = parser.parse_args()

    from interplab.store import actfile, open_store

    root = tempfile.mkdtemp(prefix="interplab-scale-", dir="/tmp")
    uri = os.path.join(root, "store")
    sites = ["resid_pre", "resid_post", "attn_out"][: args.sites]
    n = args.rows_per_file
    total_rows = args.runs * len(sites) * args.layers * n
    print(
        f"store {uri}: {args.runs} runs x {len(sites)} sites x {args.layers} layers x {n} rows = {total_rows / 1e6:.1f} M rows, d={args.d} float16"
    )
    try:
        store = open_store(uri)
        rng = np.random.default_rng(0)
        pool = [rng.standard_normal((n, args.d)).astype(np.float16) for _ in range(7)]
        prompt_id = np.arange(n, dtype=np.int64) // 16
        position = (np.arange(n) % 16).astype(np.int32)
        token_id = rng.integers(0, 50_000, n).astype(np.int32)
        keys = actfile.KeyColumns.build(prompt_id, position, token_id, [f"t{t % 97}" for t in token_id])
        start = time.perf_counter()
        run_ids = []
        for r in range(args.runs):
            writer = store.begin_run("capture", model=f"model-{r % 4}", spec={"run": r})
            files = [
                writer.write_activation_rows(0, site, layer, None, keys, pool[(r + s + layer) % len(pool)])
                for s, site in enumerate(sites)
                for layer in range(args.layers)
            ]
            writer.finish_chunk("activations", 0, files)
            writer.commit()
            run_ids.append(writer.run_id)
            if (r + 1) % 100 == 0:
                elapsed = time.perf_counter() - start
                print(f"  {r + 1} runs committed in {elapsed:.1f} s", flush=True)
        fill_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uri) for f in fs)
        n_files = args.runs * len(sites) * args.layers
        print(f"fill: {fill_s:.1f} s ({total_rows / fill_s / 1e6:.2f} M rows/s), {size / 1e9:.2f} GB, {n_files} data files")
        store.close()

        # -- listing runs ----------------------------------------------------------------------
        times = []
        for _ in range(5):
            fresh = open_store(uri, create=False)
            t0 = time.perf_counter()
            runs = fresh.runs()
            times.append(time.perf_counter() - t0)
            fresh.close()
        assert len(runs) == args.runs
        print(
            f"Store.runs() on a fresh Store: median {statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) for {len(runs)} runs"
        )
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", "from interplab.cli.main import main; main()", "runs", "--store", uri],
            capture_output=True,
            text=True,
        )
        cli_s = time.perf_counter() - t0
        print(
            f"interplab runs (CLI, process start included): {cli_s:.2f} s, exit {proc.returncode}, {len(proc.stdout.splitlines())} lines"
        )

        # -- a query filtered by run, site and layer ------------------------------------------------
        store = open_store(uri, create=False)
        target = run_ids[len(run_ids) // 2]
        query = (
            "SELECT count(*) AS n, avg(act[1]) AS mean0 FROM activations WHERE run_id = $r AND site = 'resid_post' AND layer = 3"
        )
        params = {"r": target}
        t0 = time.perf_counter()
        first = store.sql(query, params).to_pylist()[0]
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            again = store.sql(query, params).to_pylist()[0]
            times.append(time.perf_counter() - t0)
        assert first == again and first["n"] == n, (first, again)
        want = pool[(run_ids.index(target) + 1 + 3) % len(pool)][:, 0].astype(np.float64).mean()
        assert abs(first["mean0"] - want) < 1e-6, (first, want)
        print(
            f"filtered query (run, site, layer): first {first_s:.2f} s (opens the session: views over {n_files} files), "
            f"then median {statistics.median(times) * 1000:.0f} ms; {first['n']} rows"
        )
        plan = store.explain(query, params)
        files_read = re.findall(r"Total Files Read:\s*(\d+)", plan)
        scanned = re.findall(r"Scanning Files:\s*(\d+)/(\d+)", plan)
        print(
            f"EXPLAIN ANALYZE: Total Files Read {files_read or '?'}; Scanning Files {scanned or '?'} (store has {n_files} data files)"
        )
        if not files_read and not scanned:
            print(plan)

        # -- the same query on one session (no runs listing): views over the runs it reads (default),
        # over every file (hashes agree: no union_by_name), over every file with union_by_name (what
        # manifests without schema hashes get)
        import dataclasses

        from interplab.store import query as query_module
        from interplab.store.query import Session

        unhashed = [
            dataclasses.replace(r, files=tuple(dataclasses.replace(e, schema_hash=None) for e in r.files)) for r in store.runs()
        ]
        variants = [
            ("views over the runs the query reads", store.runs(), query_module.NARROW_MIN_FILES),
            ("views over every file, one schema", store.runs(), 10**9),
            ("views over every file, union_by_name", unhashed, 10**9),
        ]
        medians = []
        for label, listed, narrow_min in variants:
            query_module.NARROW_MIN_FILES = narrow_min
            session = Session(store.location, listed)
            session_times = []
            for _ in range(3):
                t0 = time.perf_counter()
                assert session.execute(query, params).to_pylist()[0] == first
                session_times.append(time.perf_counter() - t0)
            session.close()
            medians.append(statistics.median(session_times))
            print(f"same query, one session, {label}: median {medians[-1] * 1000:.0f} ms; / first row = {medians[-1] / medians[0]:.1f}")
        query_module.NARROW_MIN_FILES = variants[0][2]

        # -- the same selection as files, from the manifests (what to_ray_dataset reads) --------------
        from interplab.store.ray_data import selection_files

        where = "run_id = $r AND site = 'resid_post' AND layer = 3"
        sel_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            picked = selection_files(store, "activations", where=where, params=params)
            sel_times.append(time.perf_counter() - t0)
        assert len(picked) == 1, picked
        print(
            f"selection_files (to_ray_dataset's file selection, runs listing included): median {statistics.median(sel_times) * 1000:.0f} ms -> {len(picked)} of {n_files} files"
        )

        # -- baselines: DuckDB's own Parquet reader over the committed file list, no store views --------
        committed = [
            store.location.path(e.path) for r in store.runs(status="committed") for e in r.files if e.table == "activations"
        ]
        exact = [p for p in committed if f"run_id={target}/site=resid_post/layer=3/" in p]
        for label, files, union in (
            ("all files, union_by_name", committed, True),
            ("all files", committed, False),
            ("only the target's files", exact, False),
        ):
            median = _direct_query(files, union, target)
            ratio = statistics.median(times) / median
            print(f"baseline read_parquet({label}): median {median * 1000:.0f} ms; store query / baseline = {ratio:.1f}")
        store.close()
    finally:
        if args.keep:
            print(f"kept: {uri}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _direct_query(files: list[str], union_by_name: bool, run_id: str) -> float:
    """Median seconds of the filtered count through DuckDB's read_parquet over ``files`` (5 runs)."""
    import duckdb

    listing = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    source = (
        f"read_parquet({listing}, hive_partitioning = true, union_by_name = {str(union_by_name).lower()}, "
        "hive_types = {'run_id': VARCHAR, 'site': VARCHAR, 'layer': INTEGER})"
    )
    con = duckdb.connect()
    con.execute(f"CREATE VIEW acts AS SELECT * FROM {source}")
    query = "SELECT count(*) FROM acts WHERE run_id = $r AND site = 'resid_post' AND layer = 3"
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        con.execute(query, {"r": run_id}).fetchall()
        times.append(time.perf_counter() - t0)
    con.close()
    return statistics.median(times)


if __name__ == "__main__":
    main()
