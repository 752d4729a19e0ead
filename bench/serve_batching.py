"""Cross-request batching: 16 concurrent clients x 25 single-patch ``run`` requests on a served
SmolLM2-135M (one IOI prompt, one resid_pre patch each), with batching on vs the same service with
batching off, in the same run.

    python bench/serve_batching.py [--clients 16] [--requests 25] [--replica-cpus 2] [--window-ms 5] [--regroup R] [--gpus 0.5]

Prints requests/s of both, the ratio, the batch sizes the batched replica ran, and checks that every
answer equals the same patch run alone on a local copy of the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import TOKENS, deploy, ioi_patch_requests, start, stop  # noqa: E402


def drive(model, requests, clients: int) -> tuple[float, list[torch.Tensor]]:
    """Send ``requests`` from ``clients`` threads (each its own share, one request at a time)."""
    shares = [requests[i::clients] for i in range(clients)]

    def client(share):
        return [model.run(batch, interventions=patch, logits="last").logits for batch, patch in share]

    start_t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(client, shares))
    elapsed = time.perf_counter() - start_t
    out: list[torch.Tensor] = [torch.empty(0)] * len(requests)
    for i, share in enumerate(answers):
        for j, logits in enumerate(share):
            out[i + j * clients] = logits
    return elapsed, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (0: CPU; two replicas share a GPU at 0.5)")
    parser.add_argument("--regroup", type=float, default=None, help="the batching config's regroup (default: its default)")
    args = parser.parse_args()

    from interplab import load_model
    from interplab.serve import connect
    from interplab.serve.deployment import stats

    url, tokens = start(num_cpus=int(2 * args.replica_cpus) + 1)
    try:
        batching = {"window_ms": args.window_ms} | ({"regroup": args.regroup} if args.regroup is not None else {})
        deploy("smol-batched", tokens, num_cpus=args.replica_cpus, num_gpus=args.gpus, batching=batching)
        deploy("smol-alone", tokens, num_cpus=args.replica_cpus, num_gpus=args.gpus, batching={"enabled": False})
        local = load_model("smollm2-135m")
        requests = ioi_patch_requests(local, args.clients * args.requests)
        session = connect(url, token=TOKENS["alice"])
        results = {}
        model = session.model("smol-batched")
        model.run(requests[0][0], interventions=requests[0][1], logits="last")
        rss_one = stats("smol-batched")["process"]["rss_mb"]  # one client connected
        busy = {}
        for name in ("smol-alone", "smol-batched"):
            model = session.model(name)
            drive(model, requests[: args.clients], args.clients)  # warm-up: one request per client
            before = stats(name)["model_s"]
            results[name] = drive(model, requests, args.clients)
            busy[name] = stats(name)["model_s"] - before
        rss_many = stats("smol-batched")["process"]["rss_mb"]  # after 16 clients' requests
        weights_mb = sum(p.numel() * p.element_size() for p in local.model.parameters()) / 2**20
        sizes = stats("smol-batched")["batching"]["batch_sizes"]
        threads = stats("smol-batched")["process"]["threads"]
        check = [0, len(requests) // 2, len(requests) - 1]
        worst = 0.0
        for i in check:
            batch, patch = requests[i]
            want = local.run(batch, interventions=patch, logits="last").logits
            for name in results:
                worst = max(worst, float((results[name][1][i] - want).abs().max()))
        n = len(requests)
        alone, batched = results["smol-alone"][0], results["smol-batched"][0]
        print(
            f"SmolLM2-135M served, {args.clients} clients x {args.requests} single-patch run requests "
            f"(one IOI prompt, seq {requests[0][0].seq_len}, logits=last), replica {args.replica_cpus:g} CPUs / {threads} torch threads"
        )
        print(f"batching off     {alone:7.2f} s  {n / alone:7.1f} requests/s  model thread busy {busy['smol-alone']:.2f} s")
        print(
            f"batching on      {batched:7.2f} s  {n / batched:7.1f} requests/s  model thread busy {busy['smol-batched']:.2f} s"
            f"  (window {args.window_ms:g} ms)"
        )
        print(f"throughput ratio {alone / batched:7.2f}x")
        print(f"batch sizes (requests per forward: count, warm-up included): {sizes}")
        print(
            f"replica memory (RSS): {rss_one:.0f} MB with 1 client, {rss_many:.0f} MB after {args.clients} clients; "
            f"the weights are {weights_mb:.0f} MB (one copy per replica)"
        )
        print(f"max |served - local| over {len(check)} checked answers x 2 services: {worst:.2e}")
    finally:
        stop()


if __name__ == "__main__":
    main()
