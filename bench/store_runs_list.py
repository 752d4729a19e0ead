"""Listing a store of 1,000 runs: ``Store.runs()``, the filtered listing and ``interplab runs``.

Fills a fresh store with N small committed runs (one activation file each, varied owners, teams,
kinds and tags, a few failed) through the real writer, then times:

* ``raw read``: list ``runs/`` and read every record file's bytes (the I/O floor, the baseline);
* ``Store.runs()`` cold (a new Store object) and warm (records cached in the object);
* ``select_runs`` filters over the listed runs;
* ``interplab runs`` in a fresh process (``--format json``), against ``python -c "import interplab"``
  in a fresh process (the interpreter's start-up floor).

    python bench/store_runs_list.py [--runs 1000] [--repeats 5] [--store DIR] [--baseline-code DIR]

``--baseline-code DIR`` (another checkout's ``platform/`` folder, e.g. from ``git archive``) also runs
``interplab runs`` with that code first on ``PYTHONPATH``, alternating with this checkout's, so both
see the same machine load; the ratio is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from interplab.cli.store_cmds import select_runs
from interplab.store import fs, open_store


def fill(uri: str, n: int) -> None:
    store = open_store(uri)
    rng = np.random.default_rng(0)
    keys = dict(prompt_id=np.arange(8, dtype=np.int64), position=np.zeros(8, np.int32), token_id=np.zeros(8, np.int32))
    for i in range(n):
        writer = store.begin_run(
            ("capture", "patching", "circuits")[i % 3],
            model=("SmolLM2-135M", "gpt2")[i % 2],
            spec={"i": i},
            owner=f"user{i % 7}",
            team=f"team{i % 3}",
            inputs=[f"run-{i - 1:05d}"] if i % 10 == 5 else None,
            run_id=f"run-{i:05d}",
        )
        if i % 50 == 49:
            writer.fail("synthetic failure")
            continue
        writer.write_activations(
            0, "resid_pre", i % 4, None, **keys, token=["t"] * 8, act=rng.standard_normal((8, 16)).astype(np.float32)
        )
        writer.commit({"timings": {"wall_s": 1.0, "phases": {"compute_s": 0.5}}})
        if i % 25 == 0:
            store.tag(f"run-{i:05d}", "baseline")


def raw_read(uri: str) -> int:
    loc = fs.resolve(uri)
    n = 0
    for info in fs.list_files(loc, loc.path("runs")):
        n += len(fs.read_bytes(loc, info.path) or b"")
    return n


def _cli_in_process(uri: str) -> None:
    """``interplab runs --store URI --format json`` in this process (imports already done)."""
    import contextlib
    import io

    from interplab.cli.main import _register, cli

    _register()
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["runs", "--store", uri, "--format", "json"], standalone_mode=False)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child_cpu(cmd: list[str], env: dict[str, str], repeats: int) -> float:
    """Median user+sys CPU seconds of a child process (what its wall time is on an idle core)."""
    times = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store", default=None, help="Directory for the store (default: a temporary one).")
    ap.add_argument("--baseline-code", default=None, help="A platform/ folder of other code to compare with.")
    args = ap.parse_args()
    uri = args.store or os.path.join(tempfile.mkdtemp(prefix="interplab-bench-"), "store")

    t0 = time.perf_counter()
    fill(uri, args.runs)
    print(f"filled {args.runs} runs in {time.perf_counter() - t0:.1f} s at {uri}")

    base = timed(lambda: raw_read(uri), args.repeats)
    cold = timed(lambda: open_store(uri, create=False).runs(), args.repeats)
    warm_store = open_store(uri, create=False)
    warm_store.runs()
    warm = timed(warm_store.runs, args.repeats)
    listed = warm_store.runs()
    filt = timed(lambda: select_runs(listed, owner="user3", kind="capture", tags=("baseline",), since="2000-01-01"), args.repeats)
    assert len(listed) == args.runs

    env = {**os.environ, "INTERPLAB_CATALOG": os.path.join(uri, "no-catalog.toml")}
    runner = "import sys; from interplab.cli.main import main; sys.argv = ['interplab', *sys.argv[1:]]; main()"
    cli_cmd = [sys.executable, "-c", runner, "runs", "--store", uri, "--format", "json"]
    start_floor = timed(lambda: subprocess.run([sys.executable, "-c", "import interplab"], check=True, env=env), args.repeats)
    cli = timed(lambda: subprocess.run(cli_cmd, check=True, env=env, stdout=subprocess.DEVNULL), args.repeats)
    imports = "from interplab.cli.main import _register; _register()"
    cli_imports = timed(lambda: subprocess.run([sys.executable, "-c", imports], check=True, env=env), args.repeats)
    in_process = timed(lambda: _cli_in_process(uri), args.repeats)
    cli_cpu = child_cpu(cli_cmd, env, args.repeats)
    imports_cpu = child_cpu([sys.executable, "-c", imports], env, args.repeats)

    print(f"{'what':<44}{'median s':>10}{'× baseline':>12}")
    rows = [
        ("raw read of every record (baseline)", base, base),
        ("Store.runs() cold (new Store)", cold, base),
        ("Store.runs() warm (records cached)", warm, base),
        ("select_runs (owner+kind+tag+since)", filt, base),
        ("python -c 'import interplab' (floor)", start_floor, start_floor),
        ("CLI imports only (process)", cli_imports, start_floor),
        ("interplab runs --format json (process)", cli, start_floor),
        ("interplab runs --format json (in process)", in_process, base),
    ]
    for name, value, ref in rows:
        print(f"{name:<44}{value:>10.3f}{value / ref:>12.2f}")
    print(f"{'CLI imports only (process), CPU s':<44}{imports_cpu:>10.3f}")
    print(f"{'interplab runs (process), CPU s':<44}{cli_cpu:>10.3f}")
    print(f"interplab runs over {args.runs} runs: {cli:.3f} s wall, {cli_cpu:.3f} s CPU (target < 1 s)")
    if args.baseline_code:
        other = {**env, "PYTHONPATH": os.pathsep.join([args.baseline_code, env.get("PYTHONPATH", "")])}
        walls: dict[str, list[float]] = {"this": [], "baseline": []}
        cpus: dict[str, list[float]] = {"this": [], "baseline": []}
        for _ in range(args.repeats):  # alternate, so both see the same load
            for name, run_env in (("baseline", other), ("this", env)):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run(cli_cmd, check=True, env=run_env, stdout=subprocess.DEVNULL)
                walls[name].append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        w = {k: statistics.median(v) for k, v in walls.items()}
        c = {k: statistics.median(v) for k, v in cpus.items()}
        print(
            f"interplab runs, baseline code {args.baseline_code}: {w['baseline']:.3f} s wall, {c['baseline']:.3f} s CPU; "
            f"this code: {w['this']:.3f} s wall, {c['this']:.3f} s CPU; baseline / this: {w['baseline'] / w['this']:.2f}x wall, "
            f"{c['baseline'] / c['this']:.2f}x CPU"
        )


if __name__ == "__main__":
    main()
