"""ACDC wall time vs EAP-IG on the same IOI task (same process, same prompts).

    python bench/circuits_acdc.py --model tiny-gpt2 --n 8
    python bench/circuits_acdc.py --model smollm2-135m --n 8 --acdc-steps 60   # extrapolated

ACDC needs one patched forward per edge, sequentially; on a large graph the script times
``--acdc-steps`` steps of it (from the logits backwards, as ACDC runs) and extrapolates to the graph.
"""

from __future__ import annotations

import argparse
import time

import torch

from interplab import load_model
from interplab.analyses.circuits.evaluate import run_patched
from interplab.analyses.circuits.scores import acdc, score_edges
from interplab.analyses.circuits.task import prepare
from interplab.analyses.tasks import PairSet, ioi_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--acdc-steps", type=int, default=0, help="time this many ACDC steps and extrapolate (0: run it all)")
    args = parser.parse_args()
    model = load_model(args.model)
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, args.n, seed=0, template=0))
    task = prepare(model, pairs)
    graph = task.graph
    t0 = time.perf_counter()
    score_edges(task, "eap-ig-inputs", ig_steps=5)
    t_ig = time.perf_counter() - t0
    if args.acdc_steps:
        patched = graph.empty()
        rows = torch.arange(task.n)
        steps = 0
        t0 = time.perf_counter()
        for dest in reversed(range(graph.n_dests)):
            for src in reversed(range(graph.upstream(dest))):
                patched[src, dest] = True
                run_patched(task, patched[None].expand(task.n, -1, -1), rows, metric="kl")
                steps += 1
                if steps >= args.acdc_steps:
                    break
            if steps >= args.acdc_steps:
                break
        per_step = (time.perf_counter() - t0) / steps
        t_acdc = per_step * (graph.n_edges + 1)
        how = f"extrapolated from {steps} steps ({per_step * 1e3:.0f} ms each, late layers: a lower bound)"
    else:
        t0 = time.perf_counter()
        result = acdc(task, args.threshold, "kl")
        t_acdc = time.perf_counter() - t0
        how = f"{result.evaluations} evaluations, {int(result.circuit.sum())} edges kept"
    print(f"{args.model}, {graph.n_edges} edges, {args.n} IOI pairs, {torch.get_num_threads()} threads")
    print(f"| EAP-IG (5 steps) | {t_ig:.2f} s |")
    print(f"| ACDC (KL, threshold {args.threshold}) | {t_acdc:.1f} s | {how} |")
    print(f"| ACDC / EAP-IG | {t_acdc / t_ig:.0f}x |")


if __name__ == "__main__":
    main()
