"""HiPe vs ItP input attribution: forwards and wall time over prompt lengths, and the speed-up of
batching a round's variants over one forward per variant (same process, same prompts).

    python bench/attribution_hipe.py --model smollm2-135m --lengths 32 64 128 256 512
    python bench/attribution_hipe.py --model tiny-llama --lengths 32 64 128

Each prompt is factual sentences (``interplab/data/tasks/facts.tsv``) up to the length, ending in a
question whose answer is stated early in the prompt ("... The Eiffel Tower is located in the city of"
-> " Paris"). Perturbation: the prompt's mean embedding (the job's default). Rows per pass follow
the job's memory bound (``--memory-mb``). HiPe runs with both window rules: ``drop`` (the default)
and ``mean`` (``hipe: {keep: mean}``). Where ItP would run more than ``--itp-rows`` rows, its
round is timed on its first ``--itp-rows`` variants and scaled to n + 1 rows (marked ``~``); the
one-forward-per-variant loop is timed on ``--loop-variants`` variants and compared per variant.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch

from interplab import load_model
from interplab.analyses.attribution import HipeConfig, Perturber, attribute, build_task
from interplab.analyses.attribution.driver import default_max_rows

QUESTION = "The Eiffel Tower is located in the city of"
TARGET = " Paris"


def facts() -> list[str]:
    text = resources.files("interplab.data").joinpath("tasks").joinpath("facts.tsv").read_text()
    out = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            subject, template, attribute_ = line.split("\t")
            sentence = template.format(subject) + " " + attribute_ + "."
            if "Eiffel" not in sentence:
                out.append(sentence)
    return out


def prompt_of_length(tokenizer, length: int) -> str:
    """The Eiffel Tower's fact, then other facts, then the question: about ``length`` tokens."""
    sentences = facts()
    parts = ["The Eiffel Tower is located in the city of Paris."]
    i = 0
    while True:
        candidate = " ".join(parts + [sentences[i % len(sentences)], QUESTION])
        if len(tokenizer(candidate)["input_ids"]) > length:
            break
        parts.append(sentences[i % len(sentences)])
        i += 1
    return " ".join(parts + [QUESTION])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--perturbation", default="mean", choices=["baseline", "zero", "mean", "delete"])
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--itp-rows", type=int, default=129, help="time ItP on at most this many rows, scale the rest")
    parser.add_argument("--loop-variants", type=int, default=8, help="variants timed one forward each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model)
    print(f"model {args.model}, perturbation {args.perturbation}, {torch.get_num_threads()} torch threads")
    header = (
        f"{'tokens':>6} {'itp fw':>7} {'itp s':>8} {'drop fw':>8} {'rounds':>6} {'drop s':>8} {'mean fw':>8} "
        f"{'rounds':>6} {'mean s':>8} {'top agree':>9} {'rows/pass':>9} {'loop s/var':>10} {'batch s/var':>11} "
        f"{'batch x':>7}"
    )
    print(header)
    for length in args.lengths:
        prompt = prompt_of_length(model.tokenizer, length)
        task = build_task(model.tokenizer, prompt, TARGET)
        rows = default_max_rows(model, task.n_tokens, len(task.target_ids), args.memory_mb)
        Perturber(model, task, args.perturbation).logprobs([[]])  # warm-up
        runs = {
            keep: attribute(
                model, task, method="hipe", perturbation=args.perturbation, max_rows=rows, config=HipeConfig(keep=keep)
            )
            for keep in ("drop", "mean")
        }
        n = task.n_units
        if n + 1 <= args.itp_rows:
            itp = attribute(model, task, method="itp", perturbation=args.perturbation, max_rows=rows)
            itp_s, itp_rows, exact = itp.seconds, itp.cost.forwards, True
            batch_per_variant = itp_s / itp_rows
            top_itp = max(range(n), key=lambda u: itp.scores.attribution[u])
            agree = []
            for run in runs.values():
                single = [u for u in range(n) if run.scores.window[u] == 1]
                top = max(single, key=lambda u: run.scores.attribution[u]) if single else None
                agree.append("y" if top == top_itp else "n")
            agreement = "/".join(agree)
        else:
            perturber = Perturber(model, task, args.perturbation, max_rows=rows)
            started = time.perf_counter()
            perturber.attributions([[u] for u in range(args.itp_rows - 1)])
            timed = time.perf_counter() - started
            batch_per_variant = timed / args.itp_rows
            itp_rows, exact = n + 1, False
            itp_s = batch_per_variant * itp_rows
            agreement = "-"
        loop = Perturber(model, task, args.perturbation, max_rows=1)
        loop.logprobs([[]])  # the mean embedding and a warm pass
        count = min(args.loop_variants, n)
        started = time.perf_counter()
        loop.logprobs([[u] for u in range(count)])
        loop_per_variant = (time.perf_counter() - started) / count
        mark = "" if exact else "~"
        drop, mean = runs["drop"], runs["mean"]
        print(
            f"{task.n_tokens:>6} {itp_rows:>7} {mark + f'{itp_s:.1f}':>8} {drop.cost.forwards:>8} {drop.cost.rounds:>6} "
            f"{drop.seconds:>8.1f} {mean.cost.forwards:>8} {mean.cost.rounds:>6} {mean.seconds:>8.1f} {agreement:>9} "
            f"{rows:>9} {loop_per_variant:>10.4f} {batch_per_variant:>11.4f} {loop_per_variant / batch_per_variant:>7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
