"""Capture overhead: a forward that captures every resid_pre/resid_mid/resid_post/attn_out/mlp_out
site vs a bare transformers forward of the same batch (same process, interleaved repeats).

    python bench/engine_capture.py [--model smollm2-135m] [--batch 8] [--seq 64] [--repeats 7] [--device cpu] [--by-kind]

Prints medians and the ratio to the bare forward (goal <= 1.03x). ``--by-kind`` also times captures of
each group of site kinds against interplab's own forward without capture.

interplab writes full logits into reused memory on CPU (``engine/arena.py``), which a bare forward
cannot: it maps 4 x batch x seq x vocab fresh bytes per call. The row "bare transformers, logits into
reused memory" runs transformers' own body and then the unembedding into one kept buffer, so the
part of the ratio that comes from that reuse can be read off in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--by-kind", action="store_true", help="also time each group of site kinds alone")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from interplab import load_model
    from interplab.engine import TokenBatch
    from interplab.models.loading import resolve_source

    hooked = load_model(args.model, dtype=args.dtype, device=args.device)
    bare = AutoModelForCausalLM.from_pretrained(resolve_source(args.model), dtype=getattr(torch, args.dtype)).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, hooked.d_vocab, (args.batch, args.seq), generator=gen)
    batch = TokenBatch.from_ids(ids.tolist()).to(args.device)
    sites = [s for s in hooked.sites(["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare_forward():
        with torch.no_grad():
            bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    head = bare.get_output_embeddings()
    kept = torch.empty(args.batch * args.seq, head.weight.shape[0], dtype=head.weight.dtype, device=args.device)

    def bare_reused_logits():
        with torch.no_grad():
            hidden = bare.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            torch.mm(hidden.reshape(-1, hidden.shape[-1]), head.weight.t(), out=kept)

    def engine_plain():
        hooked.run(batch)

    def engine_capture():
        hooked.run(batch, capture=sites)

    runs = {"bare transformers forward": bare_forward, "bare transformers, logits into reused memory": bare_reused_logits,
            "interplab forward, no capture": engine_plain, f"interplab capture of {len(sites)} sites": engine_capture}
    if args.by_kind:
        for kinds in (["resid_pre", "resid_post"], ["attn_out", "mlp_out"], ["resid_mid"]):
            group = hooked.sites(kinds)
            runs[f"interplab capture of {'+'.join(kinds)}"] = lambda group=group: hooked.run(batch, capture=group)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bare transformers forward"])
    base_min = min(times["bare transformers forward"])
    tokens = args.batch * args.seq
    print(f"model={args.model} device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, samples in times.items():
        med, low = statistics.median(samples), min(samples)
        print(f"{name:44s} median {med * 1000:8.1f} ms  {tokens / med:9.0f} tok/s  ratio {med / base:5.3f}x"
              f"   | min {low * 1000:8.1f} ms  ratio {low / base_min:5.3f}x")
    plain = statistics.median(times["interplab forward, no capture"])
    for name in list(runs)[3:]:
        print(f"{name:44s} adds {(statistics.median(times[name]) - plain) * 1000:+7.1f} ms to interplab's own forward"
              f" ({statistics.median(times[name]) / plain:5.3f}x, medians)")


if __name__ == "__main__":
    main()
