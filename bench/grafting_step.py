"""Grafting costs on SmolLM2-135M: one finetune step (interplab) vs a plain transformers training step
on the same batch, and one extractive-score computation; peak memory of each in its own process.

    python bench/grafting_step.py [--facts 5] [--repeats 3] [--score-prompts 8]

Each measurement runs in a fresh subprocess (so ``ru_maxrss`` is that measurement's peak): the
interplab step is ``model.trainer(AdamConfig(lr)).step(batch, TargetLoss)`` as ``finetune``
runs it; the transformers step is a copy of the same ``LlamaForCausalLM`` (SDPA attention) called
with ``labels`` (−100 outside the answer tokens), ``loss.backward()`` and ``torch.optim.Adam``. The
first step of each (Adam state allocation) is reported separately from the steady-state median.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, facts: int, repeats: int, score_prompts: int) -> dict:
    import torch

    from interplab import load_model
    from interplab.analyses.grafting.data import first_hop
    from interplab.analyses.grafting.finetune import training_batch

    model = load_model("smollm2-135m")
    data = first_hop(model.tokenizer, 20, seed=0)
    batch, loss_fn = training_batch(model.tokenizer, data["F"][:facts])
    loaded = _peak_mib()
    times = []
    if mode == "interplab":
        from interplab.engine import AdamConfig

        trainer = model.trainer(AdamConfig(lr=1e-5))
        for _ in range(repeats + 1):
            start = time.perf_counter()
            trainer.step(batch, loss_fn)
            times.append(time.perf_counter() - start)
    elif mode == "transformers":
        import copy

        hf = copy.deepcopy(model.model)
        del model
        hf.set_attn_implementation("sdpa")
        hf.train()
        optimizer = torch.optim.Adam(hf.parameters(), lr=1e-5)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            # the label at position i is the token predicted there (TargetLoss's layout): no shift
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), loss_fn.labels.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    elif mode == "scores":
        from interplab.analyses.grafting.scores import aligned, counterfactuals, extractive_scores
        from interplab.analyses.grafting.weights import get_weights

        theta = get_weights(model)
        gen = torch.Generator().manual_seed(0)
        tuned = {n: v + 1e-4 * torch.randn(v.shape, generator=gen) for n, v in theta.items()}
        examples, cfs = aligned(model.tokenizer, data["ImplF"], counterfactuals(data["ImplF"], model.tokenizer), score_prompts)
        for _ in range(repeats):
            start = time.perf_counter()
            extractive_scores(model, theta, tuned, examples, cfs)
            times.append(time.perf_counter() - start)
        times.insert(0, times[0])
    return {"mode": mode, "first_s": times[0], "median_s": statistics.median(times[1:]), "tokens": int(batch.lengths.sum()),
            "loaded_peak_mib": loaded, "peak_mib": _peak_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=5, help="examples per training batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score-prompts", type=int, default=8)
    parser.add_argument("--mode", choices=["interplab", "transformers", "scores"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.facts, args.repeats, args.score_prompts)))
        return
    results = {}
    for mode in ("transformers", "interplab", "scores"):
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--facts", str(args.facts), "--repeats",
                               str(args.repeats), "--score-prompts", str(args.score_prompts)],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["transformers"]["median_s"]
    print(f"batch: {args.facts} facts, {results['interplab']['tokens']} tokens; SmolLM2-135M float32 CPU")
    print(f"{'measurement':<34}{'first (s)':>10}{'median (s)':>12}{'vs transformers':>17}{'peak RSS (MiB)':>16}")
    names = {"transformers": "transformers train step", "interplab": "interplab finetune step",
             "scores": f"extractive scores ({args.score_prompts} prompts)"}
    for mode, r in results.items():
        print(f"{names[mode]:<34}{r['first_s']:>10.2f}{r['median_s']:>12.2f}{r['median_s'] / base:>16.2f}x{r['peak_mib']:>16.0f}")
    print(f"ratio interplab / transformers step: {results['interplab']['median_s'] / base:.2f}")


if __name__ == "__main__":
    main()
