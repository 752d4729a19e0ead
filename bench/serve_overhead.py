"""Round-trip overhead of one small request to a served model, on localhost, beyond the model's own
forward: p50 and p99 over sequential requests (one client, nothing else queued).

    python bench/serve_overhead.py [--model smollm2-135m] [--requests 100] [--gpus 1]

Each request is one IOI prompt, ``capture=["resid_pre.5"]`` at the last position, ``logits="none"``
(a few KB each way). The model's own time is the replica's time in its model thread for that
request (``model_s`` of the replica's counters, read before and after each request, outside the
timed call); overhead = round trip - model time: the client, HTTP, Ray Serve's proxy and router,
the replica's checks, the batching queue, and encoding the answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import TOKENS, deploy, percentile, start, stop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    args = parser.parse_args()

    from interplab.serve import connect
    from interplab.serve.deployment import stats

    url, tokens = start(num_cpus=int(args.replica_cpus) + 1)
    try:
        deploy("overhead", tokens, model=args.model, num_cpus=args.replica_cpus, num_gpus=args.gpus)
        model = connect(url, token=TOKENS["alice"]).model("overhead")
        prompt = ["When Mary and John went to the store, John gave a drink to"]
        site = "resid_pre.5" if model.n_layers > 5 else "resid_pre.1"
        for _ in range(5):  # warm-up
            model.run(prompt, capture=[site], positions=[-1], logits="none")
        rtts, overheads, forwards = [], [], []
        for _ in range(args.requests):
            before = stats("overhead")["model_s"]
            t0 = time.perf_counter()
            model.run(prompt, capture=[site], positions=[-1], logits="none")
            rtt = time.perf_counter() - t0
            forward = stats("overhead")["model_s"] - before
            rtts.append(rtt * 1000)
            forwards.append(forward * 1000)
            overheads.append((rtt - forward) * 1000)
        print(
            f"{args.model} served on localhost, {args.requests} sequential small run requests "
            f"(1 prompt, capture {site} at the last position, logits=none)"
        )
        print(f"round trip       p50 {percentile(rtts, 0.5):7.2f} ms  p99 {percentile(rtts, 0.99):7.2f} ms")
        print(f"model forward    p50 {percentile(forwards, 0.5):7.2f} ms  p99 {percentile(forwards, 0.99):7.2f} ms")
        print(
            f"overhead         p50 {percentile(overheads, 0.5):7.2f} ms  p99 {percentile(overheads, 0.99):7.2f} ms  (goal p50 <= 15 ms)"
        )
    finally:
        stop()


if __name__ == "__main__":
    main()
