"""Reuse: the content-key lookup with 1,000 runs in a store, and a reused capture vs computing it fresh.

    python bench/store_reuse.py [--runs 1000] [--models tiny-llama smollm2-135m] [--prompts 32] [--new 8] [--s3]

1. **Lookup.** Fills a fresh local store with ``--runs`` committed runs (each with a content key and a
   small activation file), then times :func:`interplab.store.reuse.runs_with_key` (the index: one
   folder listing and the matching run's records) for a hit and a miss on a fresh ``Store`` object
   each time, against the fallback that reads every run record (``scan=True``), in the same run;
   with ``--s3`` again on a moto S3 server (real HTTP on loopback).
2. **Reuse vs fresh**, per model, through :func:`interplab.jobs.execute.run_job` (embedded local
   Ray, as ``interplab run`` does): a capture job computed fresh; the same job again (found by its
   content key: no Ray, no model); a superset with ``--new`` more prompts (capture-level reuse:
   only the new prompts run) against the same superset computed fresh in another store. Also the
   whole ``interplab run`` command for the repeated job (a new process: imports, spec validation,
   key, lookup). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def fill(store, n: int) -> list[str]:
    from interplab.store import reuse

    keys = []
    rng = np.random.default_rng(0)
    for i in range(n):
        key = f"{i:032x}"
        keys.append(key)
        w = store.begin_run("capture", model="bench", spec={"i": i}, provenance={reuse.CONTENT_KEY: key})
        rows = 16
        w.write_activations(
            0,
            "resid_post",
            1,
            None,
            np.arange(rows, dtype=np.int64),
            np.zeros(rows, np.int32),
            np.zeros(rows, np.int32),
            ["t"] * rows,
            rng.standard_normal((rows, 8)).astype(np.float32),
        )
        w.commit()
    return keys


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return statistics.median(out)


def bench_lookup(n: int, repeats: int, s3: bool = False) -> None:
    from interplab.store import open_store, reuse

    with tempfile.TemporaryDirectory() as tmp, _moto() if s3 else _nothing() as endpoint:
        uri = "s3://bench/store" if endpoint else os.path.join(tmp, "store")
        print(f"\nstore: {uri}" + (f" (moto server at {endpoint})" if endpoint else ""))
        started = time.perf_counter()
        keys = fill(open_store(uri), n)
        print(f"filled {n} committed runs in {time.perf_counter() - started:.1f} s")
        hit = keys[n // 2]
        assert len(reuse.runs_with_key(open_store(uri), hit)) == 1 and not reuse.runs_with_key(open_store(uri), "f" * 32)
        t_hit = timed(lambda: reuse.runs_with_key(open_store(uri), hit), repeats)
        t_miss = timed(lambda: reuse.runs_with_key(open_store(uri), "f" * 32), repeats)
        t_scan = timed(lambda: reuse.runs_with_key(open_store(uri), hit, scan=True), max(1, repeats // 3))
        print(f"lookup, index, hit : {t_hit * 1000:8.1f} ms (median of {repeats}, fresh Store each)")
        print(f"lookup, index, miss: {t_miss * 1000:8.1f} ms")
        print(f"lookup, full scan  : {t_scan * 1000:8.1f} ms (reads every run record; {t_scan / t_hit:.0f}x the index)")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


class _moto:
    """A moto S3 server on loopback (a separate process, real HTTP), with a bucket ``bench``."""

    def __enter__(self) -> str:
        import socket
        import urllib.request

        import boto3

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        return url

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _job(model: str, prompts: list[str], store: str):
    from interplab.jobs.prepare import prepare

    raw = {
        "kind": "capture",
        "model": model,
        "prompts": prompts,
        "sites": ["resid_post.1", "resid_post.5" if model != "tiny-llama" else "z.1"],
        "positions": "all",
        "batch_size": 8,
    }
    return prepare(raw, store=store), raw


def _run(model: str, prompts: list[str], store: str):
    from interplab.jobs.execute import run_job

    (job, uri), _ = _job(model, prompts, store)
    started = time.perf_counter()
    result = run_job(job, uri, progress=False, echo=lambda line: None)
    return time.perf_counter() - started, result


def bench_capture(model: str, n: int, new: int) -> None:
    from interplab.jobs.datasets import builtin_records, select_field

    texts = select_field(builtin_records("ioi"), "prompt", "dataset")
    base, extra = texts[:n], texts[n : n + new]
    with tempfile.TemporaryDirectory() as tmp:
        store, fresh_store = os.path.join(tmp, "store"), os.path.join(tmp, "fresh")
        t_fresh, first = _run(model, base, store)
        t_again, again = _run(model, base, store)
        assert again.reused and again.run_id == first.run_id
        t_super, superset = _run(model, base + extra, store)
        t_super_fresh, fresh = _run(model, base + extra, fresh_store)
        from interplab.store import open_store

        info = open_store(store).run(superset.run_id)
        phases = (info.metadata.get("timings") or {}).get("phases") or {}
        fresh_phases = (open_store(fresh_store).run(fresh.run_id).metadata.get("timings") or {}).get("phases") or {}
        own = sum(e.rows for e in info.files if e.table == "activations" and e.source_run is None)
        refs = sum(1 for e in info.files if e.source_run is not None)
        spec = Path(tmp) / "job.yaml"
        spec.write_text(yaml.safe_dump(_job(model, base, store)[1]))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "interplab.jobs", "run", str(spec), "--store", store, "--no-progress"],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        t_cli = time.perf_counter() - started
        assert proc.returncode == 0 and f"reused run {first.run_id}" in proc.stdout, proc.stdout + proc.stderr
    print(f"\n{model}: capture of {n} prompts (2 sites, all positions), run_job on embedded local Ray")
    print(f"  fresh                          : {t_fresh:7.2f} s")
    print(f"  same job again (content key)   : {t_again:7.3f} s   ratio fresh/reused = {t_fresh / t_again:.0f}x")
    print(f"  'interplab run' of it (process): {t_cli:7.2f} s   (imports + spec parse + key + lookup; no torch)")
    print(
        f"  superset +{new} prompts, reusing: {t_super:7.2f} s   vs fresh {t_super_fresh:.2f} s: "
        f"ratio {t_super_fresh / t_super:.2f}x ({own} own rows, {refs} referenced files)"
    )
    for name in sorted(set(phases) | set(fresh_phases)):
        a, b = phases.get(name), fresh_phases.get(name)
        ratio = f"ratio {b / a:.2f}x" if a and b else ""
        print(
            f"    phase {name:<14}: reusing {a if a is not None else '-':>7} s, fresh {b if b is not None else '-':>7} s  {ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="*", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--s3", action="store_true", help="also time the lookup on S3 (a moto server on loopback)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bench_lookup(args.runs, args.repeats)
    if args.s3:
        bench_lookup(args.runs, args.repeats, s3=True)
    for model in args.models:
        bench_capture(model, args.prompts, args.new)


if __name__ == "__main__":
    main()
