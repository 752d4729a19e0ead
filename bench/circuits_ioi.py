"""IOI circuit of a model (default SmolLM2-135M): scoring cost, faithfulness, exact check, head roles.

    python bench/circuits_ioi.py --n 16 --exact-top 400 --out /tmp/circuits

Prints (and writes ``results.json`` under ``--out``):
* EAP and EAP-IG (5 steps) scoring time over the full graph / one plain transformers forward+backward
  of the same batch, and one circuit evaluation / one plain forward;
* faithfulness of EAP-IG circuits on MIB's size grid (CPR, CMD) and of greedy circuits at fixed sizes;
* exact edge patching of the ``--exact-top`` best EAP-IG edges, and circuits ranked by it;
* the heads with the largest EAP-IG node scores, with where they attend (END -> IO/S1/S2, S2 -> S1/S1+1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interplab import load_model
from interplab.analyses.circuits import extract
from interplab.analyses.circuits.evaluate import evaluate
from interplab.analyses.circuits.faithfulness import cpr_cmd, faithfulness_curve, write_mib
from interplab.analyses.circuits.scores import exact, score_edges
from interplab.analyses.circuits.task import prepare
from interplab.analyses.tasks import PairSet, ioi_pairs


def timed(fn, repeats=3):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bare_forward_backward(model, pairs):
    hf = model.model
    ids, mask = pairs.clean.input_ids, pairs.clean.attention_mask
    last = pairs.clean.last_positions()
    rows = torch.arange(len(ids))

    def fwd():
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask).logits

    def fwd_bwd():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=ids, attention_mask=mask).logits[rows, last]
        (logits[rows, pairs.answer] - logits[rows, pairs.wrong]).mean().backward()

    return fwd, fwd_bwd


def head_roles(model, pairs, heads: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Mean attention of each head from END to IO/S1/S2 and from S2 to S1/S1+1 (template 0 positions)."""
    order_baba = [p.clean.split(" and ")[0].split()[-1] != p.answer.strip() for p in pairs.pairs]
    end, s2 = pairs.clean.seq_len - 1, 10
    layers = sorted({layer for layer, _ in heads})
    cache = model.run(pairs.clean, capture=[f"pattern.{layer}" for layer in layers], positions=[s2, end]).cache
    out = {}
    for layer, head in heads:
        pat = cache[f"pattern.{layer}"][:, head]  # [b, 2 (S2, END), keys]
        io_pos = torch.tensor([4 if baba else 2 for baba in order_baba])
        s1_pos = torch.tensor([2 if baba else 4 for baba in order_baba])
        rows = torch.arange(len(io_pos))
        out[f"a{layer}.h{head}"] = {
            "END->IO": float(pat[rows, 1, io_pos].mean()),
            "END->S1": float(pat[rows, 1, s1_pos].mean()),
            "END->S2": float(pat[:, 1, s2].mean()),
            "S2->S1": float(pat[rows, 0, s1_pos].mean()),
            "S2->S1+1": float(pat[rows, 0, s1_pos + 1].mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--exact-top", type=int, default=400)
    parser.add_argument("--greedy-sizes", default="50,100,200,370,500,1000,2000")
    parser.add_argument("--out", default="/tmp/interplab-circuits")
    parser.add_argument("--timing-only", action="store_true", help="stop after the cost ratios")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, args.n, seed=0, template=0))
    task = prepare(model, pairs)
    graph = task.graph
    res: dict = {"model": args.model, "n_prompts": args.n, "n_edges": graph.n_edges,
                 "clean": float(task.clean_value.mean()), "corrupted": float(task.corrupt_value.mean()),
                 "threads": torch.get_num_threads()}
    print(f"{args.model}: {graph.n_edges} edges, {args.n} IOI pairs, clean logit diff {res['clean']:.3f}, corrupted {res['corrupted']:.3f}")

    fwd, fwd_bwd = bare_forward_backward(model, pairs)
    t_fwd, _ = timed(fwd)
    t_fb, _ = timed(fwd_bwd)
    t_eap, _ = timed(lambda: score_edges(task, "eap"), repeats=2)
    t_ig, ig = timed(lambda: score_edges(task, "eap-ig-inputs", ig_steps=5), repeats=2)
    circuit = extract.top_n(graph, ig, 370)
    t_eval, _ = timed(lambda: evaluate(task, circuit))
    res["timing"] = {"forward_s": t_fwd, "forward_backward_s": t_fb, "eap_s": t_eap, "eap_ig5_s": t_ig, "evaluate_s": t_eval,
                     "eap_over_fb": t_eap / t_fb, "eap_ig5_over_fb": t_ig / t_fb, "evaluate_over_forward": t_eval / t_fwd}
    print(f"| forward {t_fwd:.3f} s | fwd+bwd {t_fb:.3f} s | EAP {t_eap:.2f} s ({t_eap / t_fb:.2f}x fwd+bwd) | "
          f"EAP-IG(5) {t_ig:.2f} s ({t_ig / t_fb:.2f}x) | evaluate {t_eval:.3f} s ({t_eval / t_fwd:.2f}x forward) |")
    write_mib(out_dir / "eap-ig-inputs.json", graph, ig, circuit, d_model=model.d_model)
    if args.timing_only:
        (out_dir / "timing.json").write_text(json.dumps(res, indent=1))
        return

    cpr, cmd, signed, absolute = cpr_cmd(task, ig, method="eap-ig-inputs")
    res["mib"] = {"cpr": cpr, "cmd": cmd, "signed": signed.__dict__ | {"circuits": None}, "absolute": absolute.__dict__ | {"circuits": None}}
    print(f"EAP-IG CPR {cpr:.3f}  CMD {cmd:.3f}")
    print("| edges (% of graph) | kept after pruning | f signed top-n | f |score| top-n |")
    for i, size in enumerate(signed.sizes):
        print(f"| {size} ({100 * size / graph.n_edges:.1f} %) | {signed.kept[i]} | {signed.faithfulness[i]:.3f} | {absolute.faithfulness[i]:.3f} |")
    sizes = [int(s) for s in args.greedy_sizes.split(",")]
    greedy = faithfulness_curve(task, ig, sizes=sizes, rule="greedy", absolute=True, method="eap-ig-inputs")
    topn = faithfulness_curve(task, ig, sizes=sizes, rule="topn", absolute=True, method="eap-ig-inputs")
    res["fixed_sizes"] = {"sizes": sizes, "greedy": greedy.faithfulness, "topn": topn.faithfulness,
                          "greedy_kept": greedy.kept, "topn_kept": topn.kept}
    print("| edges | f greedy | f top-n (|score|) |")
    for i, size in enumerate(sizes):
        print(f"| {size} | {greedy.faithfulness[i]:.3f} | {topn.faithfulness[i]:.3f} |")

    # exact edge patching of the best EAP-IG edges
    values = ig[graph.edges[:, 0], graph.edges[:, 1]].abs()
    cand = graph.edges[torch.argsort(values, descending=True)[: args.exact_top]]
    t0 = time.perf_counter()
    exact_scores = exact(task, edges=cand)
    ex = exact_scores[cand[:, 0], cand[:, 1]]
    t_exact = time.perf_counter() - t0
    ig_c = ig[cand[:, 0], cand[:, 1]]
    corr = float(torch.corrcoef(torch.stack([ig_c, ex]))[0, 1])
    ex_curve = faithfulness_curve(task, exact_scores, sizes=[s for s in sizes if s <= args.exact_top], rule="topn", absolute=True, method="exact")
    res["exact"] = {"candidates": args.exact_top, "seconds": t_exact, "corr_with_eap_ig": corr,
                    "sizes": ex_curve.sizes, "faithfulness": ex_curve.faithfulness}
    print(f"exact patching of the top {args.exact_top} EAP-IG edges: {t_exact:.0f} s, Pearson r with EAP-IG {corr:.3f}")
    print("| edges | f exact-ranked |")
    for s, f in zip(ex_curve.sizes, ex_curve.faithfulness):
        print(f"| {s} | {f:.3f} |")

    # heads by node score (sum of signed outgoing EAP-IG edge scores)
    node = ig.sum(1)
    heads = [(layer, h) for layer in range(graph.n_layers) for h in range(graph.n_heads)]
    head_scores = torch.tensor([float(node[graph.head_source(layer, h)]) for layer, h in heads])
    top = [heads[i] for i in torch.argsort(head_scores.abs(), descending=True)[:15]]
    roles = head_roles(model, pairs, top)
    res["heads"] = [{"head": f"a{layer}.h{h}", "score": float(node[graph.head_source(layer, h)]), **roles[f"a{layer}.h{h}"]} for layer, h in top]
    mlps = sorted(range(graph.n_layers), key=lambda layer: -abs(float(node[graph.mlp_source(layer)])))[:5]
    res["mlps"] = [{"mlp": f"m{layer}", "score": float(node[graph.mlp_source(layer)])} for layer in mlps]
    print("| head | node score | END->IO | END->S1 | END->S2 | S2->S1 | S2->S1+1 |")
    for row in res["heads"]:
        print(f"| {row['head']} | {row['score']:.3f} | {row['END->IO']:.2f} | {row['END->S1']:.2f} | {row['END->S2']:.2f} | {row['S2->S1']:.2f} | {row['S2->S1+1']:.2f} |")
    print("top MLPs:", ", ".join(f"{r['mlp']} {r['score']:.3f}" for r in res["mlps"]))
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
