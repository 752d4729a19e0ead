"""End to end: ``interplab run`` of an IOI resid_pre patching spec against an already-served
SmolLM2-135M, vs the same sweep in nnsight (one trace per patch, its own process, model load
included), in the same run.

    python bench/serve_e2e.py [--prompts 8] [--nnsight-layers all|K] [--replica-cpus 2] [--gpus 1]

The service is deployed first (not timed: it is already running for the lab). ``interplab run``
(``jobs/ioi-patching-served.yaml``) is timed as a whole process: CLI start, validation against the
service, the sweep, the store commit. nnsight is timed as a whole process too: imports, model load,
then one trace per (layer, position) patch; with ``--nnsight-layers K`` it runs K evenly spaced
layers and its sweep time is scaled to all layers (load and imports are not scaled). The two
results are compared patch by patch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from serve_common import REPO, TOKENS, deploy, start, stop  # noqa: E402

SPEC = REPO / "jobs" / "ioi-patching-served.yaml"


def nnsight_process(prompts: int, layers: str, out: str, device: str = "cpu") -> None:
    """The nnsight side (run in its own process by ``--nnsight-only``): load, then one trace per patch."""
    started = time.perf_counter()
    import torch
    from interplab.analyses.tasks import PairSet, ioi_pairs
    from interplab.models.loading import resolve_source
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    lm = LanguageModel(hf, tokenizer=tokenizer)
    pairs = PairSet.tokenize(tokenizer, ioi_pairs(tokenizer, prompts, seed=0, corruption="abc"))
    loaded = time.perf_counter()
    n_layers = hf.config.num_hidden_layers
    chosen = list(range(n_layers))
    if layers != "all":
        k = int(layers)
        chosen = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    answer, wrong = pairs.answer[:, None].to(device), pairs.wrong[:, None].to(device)
    values = {}
    with torch.no_grad():
        for layer in chosen:
            with lm.trace(pairs.clean.input_ids.to(device)):
                clean = lm.model.layers[layer].input.save()
            for pos in range(pairs.clean.seq_len):
                with lm.trace(pairs.corrupted.input_ids.to(device)):
                    lm.model.layers[layer].input[:, pos] = clean[:, pos]
                    logits = lm.lm_head.output[:, -1].save()
                values[f"{layer},{pos}"] = float((logits.gather(1, answer) - logits.gather(1, wrong)).mean())
    done = time.perf_counter()
    Path(out).write_text(
        json.dumps(
            {"load_s": loaded - started, "sweep_s": done - loaded, "layers": len(chosen), "n_layers": n_layers, "values": values}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--nnsight-layers", default="all")
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs of the served replica; nnsight then runs on CUDA too")
    parser.add_argument("--nnsight-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nnsight_only:
        nnsight_process(args.prompts, args.nnsight_layers, args.nnsight_only, "cuda" if args.gpus else "cpu")
        return

    url, tokens = start(num_cpus=int(args.replica_cpus) + 1)
    work = Path(tempfile.mkdtemp(prefix="interplab-e2e-"))
    try:
        deploy("smollm2-135m", tokens, num_cpus=args.replica_cpus, num_gpus=args.gpus)
        env = {**os.environ, "INTERPLAB_TOKEN": TOKENS["alice"]}
        env.pop("RAY_ADDRESS", None)
        command = [
            "interplab",
            "run",
            str(SPEC),
            "--set",
            f"service.url={url}",
            "--set",
            f"dataset.n={args.prompts}",
            "--store",
            str(work / "store"),
            "--no-progress",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        ours = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"interplab run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("run_id:"))

        out = work / "nnsight.json"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--prompts",
                str(args.prompts),
                "--nnsight-layers",
                args.nnsight_layers,
                "--gpus",
                str(args.gpus),
                "--nnsight-only",
                str(out),
            ],
            check=True,
        )
        theirs_measured = time.perf_counter() - t0
        ref = json.loads(out.read_text())
        scale = ref["n_layers"] / ref["layers"]
        theirs = theirs_measured + ref["sweep_s"] * (scale - 1)

        from interplab.store import open_store

        store = open_store(str(work / "store"), create=False)
        rows = store.sql("SELECT layer, position, value FROM patching WHERE run_id = $r", {"r": run_id}).to_pylist()
        values = {f"{r['layer']},{r['position']}": r["value"] for r in rows}
        diff = max(abs(values[k] - v) for k, v in ref["values"].items())
        service = store.run(run_id).provenance["service"]
        print(f"IOI resid_pre patching, {args.prompts} prompts, {len(values)} patches (layers x positions), SmolLM2-135M, {'CUDA' if args.gpus else 'CPU'}")
        print(f"interplab run against the served model (whole process)   {ours:8.2f} s   (run {run_id}, user {service['user']})")
        print(
            f"nnsight, one trace per patch (whole process, load {ref['load_s']:.1f} s)  {theirs:8.2f} s"
            + (
                f"   ({ref['layers']} of {ref['n_layers']} layers measured: {theirs_measured:.1f} s, sweep scaled)"
                if scale > 1
                else ""
            )
        )
        print(f"speed-up                                                  {theirs / ours:8.2f}x   (goal >= 8x)")
        print(f"max |interplab - nnsight| over {len(ref['values'])} patches: {diff:.2e}")
    finally:
        stop()


if __name__ == "__main__":
    main()
