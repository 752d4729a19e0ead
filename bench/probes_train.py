"""Probe training throughput: LBFGS logistic-regression fits per second at SmolLM2 ``resid_post`` size,
and the speed-up of the fit's scoped single intra-op thread over torch's default thread count.

    python bench/probes_train.py                      # 196 x 576 features, 65 classes (the IOI name probe)
    python bench/probes_train.py --classes 2 --rows 1000

Features are random Gaussians with class-dependent means (a fit of the same shape and difficulty as
a real probe). Each setting fits ``--probes`` probes with ``max_iter`` fixed, so both settings do the
same work; the ratio is wall time of the default threads over wall time of one thread.
"""

from __future__ import annotations

import argparse
import time

import torch
from interplab.analyses.probes import fit as fitmod


def features(rows: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(rows) % classes
    centres = torch.randn(classes, d, generator=gen) * 0.3
    return centres[y] + torch.randn(rows, d, generator=gen), y


def timed(x: torch.Tensor, y: torch.Tensor, classes: int, probes: int, max_iter: int) -> tuple[float, int]:
    start = time.perf_counter()
    iterations = 0
    for _ in range(probes):
        iterations += fitmod.fit_probe(x, y, classes, l2=1e-2, max_iter=max_iter, tol=0.0).iterations
    return time.perf_counter() - start, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=196)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args()
    x, y = features(args.rows, args.d, args.classes, seed=0)
    print(f"{args.probes} probes of {args.rows} x {args.d}, {args.classes} classes, {args.max_iter} LBFGS iterations each")
    print(f"torch threads: {torch.get_num_threads()}")
    one, iters_one = timed(x, y, args.classes, args.probes, args.max_iter)
    saved = fitmod.SINGLE_THREAD_WORK
    fitmod.SINGLE_THREAD_WORK = 0  # every fit keeps torch's default thread count
    try:
        default, iters_default = timed(x, y, args.classes, args.probes, args.max_iter)
    finally:
        fitmod.SINGLE_THREAD_WORK = saved
    print(f"one thread (the fit's default): {one:.2f} s, {args.probes / one:.2f} probes/s, {iters_one} iterations")
    print(f"default threads:                {default:.2f} s, {args.probes / default:.2f} probes/s, {iters_default} iterations")
    print(f"ratio default / one thread: {default / one:.2f}")


if __name__ == "__main__":
    main()
