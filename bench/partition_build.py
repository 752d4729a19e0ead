"""Exemplar-partition build throughput on SmolLM2-135M ``resid_post`` (d = 576), against its floor.

    python bench/partition_build.py [--layer 15] [--prompts 120] [--join 8] [--block-rows 4096] [--cache acts.npy]
                                    [--rounds 5] [--threads N]

Activations: the 224 built-in IOI sentences joined in random groups of ``--join`` (longer contexts,
so the same words meet different residuals), ``--prompts`` prompts, every token, captured at
``resid_post.<layer>`` by the engine. Measured in the same run:

* the **build** (the streaming, vectorised leader clustering of :mod:`interplab.analyses.partition.leader`),
  in activations/s, at thresholds given as percentiles of sampled pairwise cosine distances;
* the **floor**: one matmul pass of the same rows (normalised, in the same blocks) against the final
  dictionary, keeping each row's best similarity (the least any build must do: compare every row
  with every exemplar once);
* the **plain loop** (one row at a time against the exemplars so far, torch), on the first rows only.

Prints the dictionary size per threshold and the build/floor ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from interplab.analyses.partition.leader import LeaderBuilder, build, percentile_threshold, prepare


def activations(layer: int, n_prompts: int, join: int, seed: int = 0) -> np.ndarray:
    from interplab import load_model
    from interplab.jobs import datasets

    model = load_model("smollm2-135m")
    sentences = [r["prompt"] if isinstance(r, dict) else str(r) for r in datasets.builtin_records("ioi")]
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(sentences, size=join, replace=False)) for _ in range(n_prompts)]
    site = f"resid_post.{layer}"
    rows = []
    with torch.no_grad():
        for start in range(0, len(prompts), 16):
            out = model.run(prompts[start : start + 16], capture=[site], logits="last")
            acts, lengths = out.cache[site], out.batch.lengths.tolist()
            rows += [acts[i, :n].float().numpy() for i, n in enumerate(lengths)]
    model.close()
    return np.concatenate(rows)


def floor_pass(x: np.ndarray, exemplars: torch.Tensor, block_rows: int) -> float:
    """Seconds for one pass: prepare each block and compare it with every exemplar (one matmul)."""
    start = time.perf_counter()
    t = torch.from_numpy(x)
    for i in range(0, len(x), block_rows):
        (prepare(t[i : i + block_rows], "cosine") @ exemplars.T).amax(dim=1)  # nearest by similarity
    return time.perf_counter() - start


def plain_loop(x: np.ndarray, threshold: float) -> tuple[float, int]:
    start = time.perf_counter()
    xp = prepare(torch.from_numpy(x), "cosine")
    exemplars: list[torch.Tensor] = []
    stacked = torch.empty(0, x.shape[1])
    for row in xp:
        if not exemplars or float((1 - stacked @ row).min()) > threshold:
            exemplars.append(row)
            stacked = torch.stack(exemplars)
    return time.perf_counter() - start, len(exemplars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--join", type=int, default=8)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--percentiles", default="0.5,1,2,5,10")
    parser.add_argument("--plain-rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the best of each is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--cache", default="", help="a .npy file: load the activations from it if it exists, else save them there"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        x = np.load(args.cache)
    else:
        x = activations(args.layer, args.prompts, args.join)
        if args.cache:
            np.save(args.cache, x)
    print(
        f"activations: {x.shape[0]} rows x d={x.shape[1]} (SmolLM2-135M resid_post.{args.layer}), captured in {time.perf_counter() - started:.1f} s"
    )
    rng = np.random.default_rng(0)
    sample = x[rng.choice(len(x), size=min(2000, len(x)), replace=False)]
    print(f"threads: {torch.get_num_threads()}, block_rows: {args.block_rows}")
    print(f"{'threshold':>16} {'regions':>8} {'build s':>8} {'acts/s':>10} {'floor s':>8} {'build/floor':>11}")
    for p in [float(v) for v in args.percentiles.split(",")]:
        threshold = percentile_threshold(sample, p, "cosine")
        build(x[: args.block_rows], threshold, "cosine", args.block_rows)  # warm-up
        build_s = floor_s = float("inf")
        for _ in range(args.rounds):  # interleaved, best of each: a shared machine's noise only adds time
            start = time.perf_counter()
            builder: LeaderBuilder = build(x, threshold, "cosine", args.block_rows)
            build_s = min(build_s, time.perf_counter() - start)
            floor_s = min(floor_s, floor_pass(x, builder.prepared, args.block_rows))
        label = f"p{p:g} = {threshold:.4f}"
        print(
            f"{label:>16} {builder.size:>8} {build_s:>8.3f} {len(x) / build_s:>10,.0f} {floor_s:>8.3f} {build_s / floor_s:>11.2f}"
        )
    n = min(args.plain_rows, len(x))
    threshold = percentile_threshold(sample, 2.0, "cosine")
    loop_s, loop_k = min(plain_loop(x[:n], threshold) for _ in range(3))
    fast_s = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        fast = build(x[:n], threshold, "cosine", args.block_rows)
        fast_s = min(fast_s, time.perf_counter() - start)
    if fast.size != loop_k:
        raise SystemExit(f"the plain loop found {loop_k} exemplars, the build {fast.size}")
    print(
        f"plain loop on the first {n} rows (p2): {loop_s:.2f} s ({n / loop_s:,.0f} acts/s) vs the build {fast_s:.3f} s: "
        f"{loop_s / fast_s:.1f}x faster, same {loop_k} exemplars"
    )


if __name__ == "__main__":
    main()
