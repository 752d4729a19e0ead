"""Activation patching speed: interplab's batched resid_pre layer x position sweep vs nnsight doing
the same patches one trace at a time, in the same process, on SmolLM2-135M with IOI prompts.

    python bench/patching_vs_nnsight.py [--prompts 2] [--nnsight-layers all|N] [--batch-rows 512] [--device cpu|cuda]

Prints both wall times, the speed-up, the largest difference between the two results, and the cost
of one patched row relative to a bare transformers forward of the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch


def nnsight_sweep(hf, tokenizer, pairs, layers, positions, device):
    from nnsight import LanguageModel

    lm = LanguageModel(hf, tokenizer=tokenizer)
    clean_ids, corrupt_ids = pairs.clean.input_ids.to(device), pairs.corrupted.input_ids.to(device)
    answer, wrong = pairs.answer[:, None].to(device), pairs.wrong[:, None].to(device)
    out = {}
    with torch.no_grad():
        for layer in layers:
            with lm.trace(clean_ids):
                clean = lm.model.layers[layer].input.save()
            for pos in positions:
                with lm.trace(corrupt_ids):
                    lm.model.layers[layer].input[:, pos] = clean[:, pos]
                    logits = lm.lm_head.output[:, -1].save()
                diff = logits.gather(1, answer) - logits.gather(1, wrong)
                out[(layer, pos)] = float(diff.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--nnsight-layers", default="all", help="'all' or a number of evenly spaced layers")
    parser.add_argument("--batch-rows", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both libraries run on it)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from interplab import load_model
    from interplab.analyses.patching import Sweep, activation_patching
    from interplab.analyses.tasks import PairSet, ioi_pairs
    from interplab.models.loading import resolve_source

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    model = load_model("smollm2-135m", device=args.device)
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, args.prompts, seed=0))
    hf = AutoModelForCausalLM.from_pretrained(resolve_source("smollm2-135m"), dtype=torch.float32).to(args.device).eval()
    seq = pairs.clean.seq_len
    activation_patching(model, pairs, [Sweep("resid_pre")], batch_rows=args.batch_rows)  # warm-up
    sync()
    start = time.perf_counter()
    result = activation_patching(model, pairs, [Sweep("resid_pre")], batch_rows=args.batch_rows)
    sync()
    ours = time.perf_counter() - start
    n_patches = model.n_layers * seq
    rows = n_patches * pairs.size

    layers = list(range(model.n_layers))
    if args.nnsight_layers != "all":
        k = int(args.nnsight_layers)
        layers = sorted({round(i * (model.n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    start = time.perf_counter()
    reference = nnsight_sweep(hf, model.tokenizer, pairs, layers, range(seq), args.device)
    theirs = time.perf_counter() - start
    theirs_full = theirs * model.n_layers / len(layers)

    values = {(r["layer"], r["position"]): r["value"] for r in result.rows}
    max_diff = max(abs(values[k] - v) for k, v in reference.items())

    batch = pairs.corrupted.input_ids.repeat(max(1, 64 // pairs.size), 1).to(args.device)
    with torch.no_grad():
        hf(input_ids=batch)
        sync()
        start = time.perf_counter()
        for _ in range(3):
            hf(input_ids=batch)
        sync()
        bare_row = (time.perf_counter() - start) / 3 / batch.shape[0]
    per_row = ours / result.rows_run  # rows actually computed (unchanged-value patches need none)
    print(f"SmolLM2-135M, IOI prompts={pairs.size}, seq={seq}, patches={n_patches} (layers x positions), rows={rows} ({result.rows_run} computed, {result.rows_unchanged} unchanged), device={args.device}, threads={torch.get_num_threads()}")
    print(f"interplab batched sweep          {ours:8.2f} s")
    print(f"nnsight one trace per patch      {theirs:8.2f} s over {len(layers)} layers  (full sweep: {theirs_full:8.2f} s)")
    print(f"speed-up                         {theirs_full / ours:8.1f}x")
    print(f"max |interplab - nnsight|        {max_diff:.2e}  over {len(reference)} patches")
    print(f"cost of one computed patched row         {per_row * 1000:8.2f} ms vs bare forward {bare_row * 1000:.2f} ms per row: {per_row / bare_row:.2f}x")


if __name__ == "__main__":
    main()
