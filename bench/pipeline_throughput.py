"""Throughput of the Ray pipeline backend vs the single-process engine, same machine, same batch.

    python bench/pipeline_throughput.py [--model smollm2-135m] [--batch 32] [--seq 64] [--stages 2]
        [--micro-batches 2,4,8] [--transports refs,compiled] [--lend on,off] [--repeats 5] [--device cpu|cuda]
        [--capture-batches 16] [--patching-prompts 4] [--train-rows 8] [--dp-replicas 2]

Measured in one run (interleaved repeats, medians):
- ``engine``: ``HookedModel.run(batch, logits="last")`` on the whole batch in this process;
- ``pipeline 1 stage``: the same through one Ray stage actor (Ray overhead, no stage boundary);
- ``pipeline N stages, M micro-batches``: the GPipe schedule (ratio to ``engine`` is the goal, >= 0.9x),
  once per transport: ``refs`` (object references, one actor call per stage and micro-batch) and
  ``compiled`` (a Ray Compiled Graph; NCCL between stages on GPU), and on CPU with and without
  ``lend_cores`` (idle stages' threads lent to the busy stage during fill and drain);
- ``capture stream``: ``backend.capture`` of 4 residual sites over ``--capture-batches`` batches,
  engine vs pipeline (stages write their own sites), into a temporary store;
- ``patching sweep``: the ``resid_pre`` layer x position sweep over ``--patching-prompts`` IOI pairs
  (``activation_patching``), engine vs pipeline (rows start at their own layer on both), with the
  layers split evenly and balanced by the sweep's work (``parallel.balance: work``, what a job does);
- ``training step``: one Adam step (next-token cross-entropy over ``--train-rows`` rows, full
  logits, every parameter trained) on the engine, on 2 pipeline stages, and on ``--dp-replicas``
  data-parallel replicas of 1 stage (the driver computes the loss on both replicas' logits and sends each its
  rows' logit gradient; stages all-reduce their gradients), after one untimed step that allocates
  the Adam state.

On CPU each stage gets ``cores / stages`` torch threads (the engine uses all cores); with ``--device
cuda`` all stages share the one GPU (``gpus_per_stage = 1 / stages``) and the engine runs on it too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def _configure(pipe, **update) -> None:
    """Change a live pipeline's ``parallel`` settings (transport, micro-batches, lend_cores) between runs."""
    pipe.scheduler.parallel = pipe.parallel.model_copy(update=update)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--transports", default="refs,compiled")
    parser.add_argument("--lend", default="on,off", help="CPU stages lend idle threads in fill and drain (parallel.lend_cores)")
    parser.add_argument("--capture-batches", type=int, default=16)
    parser.add_argument("--patching-prompts", type=int, default=4, help="0: skip the patching sweep")
    parser.add_argument("--train-rows", type=int, default=8, help="0: skip the training steps")
    parser.add_argument("--dp-replicas", type=int, default=2, help="data-parallel replicas in the training section (0: skip)")
    args = parser.parse_args()

    import ray

    from interplab import load_model
    from interplab.engine import TokenBatch
    from interplab.runtime import ParallelConfig
    from interplab.runtime.pipeline import PipelineModel
    from interplab.store import open_store

    cores = os.cpu_count() or 1
    gpu = args.device == "cuda"
    ray.init(address="local", num_cpus=cores, num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="warning", log_to_driver=False)
    engine = load_model(args.model, device=args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, engine.d_vocab, (args.batch, args.seq), generator=gen)
    batch = TokenBatch.from_ids(ids.tolist())
    tokens = args.batch * args.seq

    def config(stages: int, micro: int | None = None) -> ParallelConfig:
        if gpu:
            return ParallelConfig(stages=stages, gpus_per_stage=1 / stages, cpus_per_stage=1, micro_batches=micro)
        return ParallelConfig(stages=stages, cpus_per_stage=max(1, cores // stages), micro_batches=micro)

    def engine_run():
        engine.run(batch, logits="last")
        if gpu:
            torch.cuda.synchronize()

    engine_run()
    rows = []
    base = _median_time(engine_run, args.repeats)
    rows.append(("engine (single process)", base))
    one = PipelineModel(args.model, config(1, 1))
    try:
        one.run(batch, logits="last")
        rows.append(("pipeline 1 stage (Ray, no boundary)", _median_time(lambda: one.run(batch, logits="last"), args.repeats)))
    finally:
        one.close()
    pipe = PipelineModel(args.model, config(args.stages))
    _configure(pipe, transport="refs")
    try:
        for transport in args.transports.split(","):
            for micro in [int(m) for m in args.micro_batches.split(",")]:
                for lend in args.lend.split(","):
                    if gpu and lend == "off":
                        continue  # lending is for CPU stages
                    _configure(pipe, micro_batches=micro, transport=transport, lend_cores=lend == "on")
                    pipe.run(batch, logits="last")
                    t = _median_time(lambda: pipe.run(batch, logits="last"), args.repeats)
                    lent = "" if gpu else f", cores lent {lend}"
                    # a compiled graph that fails to build (no CuPy, NCCL refusing two ranks on one GPU)
                    # falls back to object references without an error: say so instead of mislabelling
                    fell_back = transport == "compiled" and not pipe.scheduler.graphs.graphs
                    note = " (no compiled graph: ran with refs)" if fell_back else ""
                    rows.append((f"pipeline {args.stages} stages, {micro} micro-batches, {transport}{lent}{note}", t))
        base_check = _median_time(engine_run, args.repeats)  # the baseline again, after the pipeline ran
        rows.append(("engine again (drift check)", base_check))

        prompts_ids = [ids[i % args.batch].tolist() for i in range(args.batch * args.capture_batches)]
        texts = [engine.tokenizer.decode(p) for p in prompts_ids]
        sites = [f"resid_post.{i}" for i in range(0, engine.n_layers, max(1, engine.n_layers // 4))][:4]
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(os.path.join(tmp, "store"))

            def capture(backend):
                writer = store.begin_run("capture", model=args.model)
                start = time.perf_counter()
                backend.capture(texts, sites, writer, batch_size=args.batch, positions=[-1])
                elapsed = time.perf_counter() - start
                writer.commit()
                return elapsed

            capture(engine)  # warm-up
            capture_tokens = sum(len(engine.tokenize(t).input_ids[0]) for t in texts[: args.batch]) * args.capture_batches
            cap_engine = capture(engine)
            _configure(pipe, transport="refs")
            cap_pipe = capture(pipe)
        sweeps = []
        if args.patching_prompts:
            from interplab.analyses.tasks import PairSet, ioi_pairs

            pairs = PairSet.tokenize(engine.tokenizer, ioi_pairs(engine.tokenizer, args.patching_prompts, seed=0))
            _configure(pipe, transport="refs", micro_batches=None)
            sweeps.append(("engine", *_sweep(engine, pairs)))
            sweeps.append((f"pipeline {args.stages} stages, layers split evenly {pipe.stage_ranges}", *_sweep(pipe, pairs)))
    finally:
        pipe.close()
    if args.patching_prompts:  # the same sweep on stages balanced by its work (layer l runs ~ l + 1 rows)
        from interplab.analyses.patching import layer_work

        with PipelineModel(args.model, config(args.stages), layer_work=lambda sk: layer_work(sk.n_layers, "exact")) as balanced:
            _configure(balanced, transport="refs", micro_batches=None)
            sweeps.append((f"pipeline {args.stages} stages, balanced by work {balanced.stage_ranges}", *_sweep(balanced, pairs)))

    device = torch.cuda.get_device_name() if gpu else f"CPU, {cores} cores, torch threads {torch.get_num_threads()}"
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, {device}, medians of {args.repeats}")
    print(f"{'configuration':66s} {'seconds':>8s} {'tokens/s':>10s} {'vs engine':>9s}")
    for name, t in rows:
        print(f"{name:66s} {t:8.3f} {tokens / t:10.0f} {base / t:8.2f}x")
    print(f"capture stream, {args.capture_batches} batches, sites {sites}:")
    print(f"{'  engine':48s} {cap_engine:8.3f} {capture_tokens / cap_engine:10.0f} {1.0:8.2f}x")
    print(f"{'  pipeline ' + str(args.stages) + ' stages':48s} {cap_pipe:8.3f} {capture_tokens / cap_pipe:10.0f} {cap_engine / cap_pipe:8.2f}x")
    if sweeps:
        t_engine, reference = sweeps[0][1], sweeps[0][2]
        print(f"patching sweep (resid_pre, {args.patching_prompts} IOI pairs, {reference.rows_run} rows computed):")
        for name, t, result in sweeps:
            diff = float((result.values("resid_pre") - reference.values("resid_pre")).abs().max())
            print(f"  {name:54s} {t:8.3f} s {t_engine / t:8.2f}x   max |diff| vs engine {diff:.1e}")
    if args.train_rows:
        train_batch = TokenBatch.from_ids(ids[: args.train_rows].tolist())
        train_tokens = args.train_rows * args.seq
        print(f"training step (Adam, all parameters, {args.train_rows} x {args.seq} tokens, full logits):", flush=True)
        t_engine = _train_time(engine, train_batch, args.repeats)
        print(f"  {'engine (single process)':54s} {t_engine:8.3f} s {train_tokens / t_engine:10.0f} tok/s {1.0:8.2f}x", flush=True)
        configs = [(f"pipeline {args.stages} stages", config(args.stages))]  # default micro-batches: 2 x stages
        if args.dp_replicas > 1:  # single-stage replicas share the machine like stages do
            share = {"gpus_per_stage": 1 / args.dp_replicas} if gpu else {"cpus_per_stage": max(1, cores // args.dp_replicas)}
            configs.append((f"{args.dp_replicas} replicas x 1 stage (data parallel)",
                            config(1, 1).model_copy(update={"replicas": args.dp_replicas, **share})))
        for name, cfg in configs:
            try:
                with PipelineModel(args.model, cfg) as backend:
                    label = f"{name} {backend.stage_ranges}" if cfg.replicas == 1 else name
                    t = _train_time(backend, train_batch, args.repeats)
                print(f"  {label:54s} {t:8.3f} s {train_tokens / t:10.0f} tok/s {t_engine / t:8.2f}x", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. NCCL refusing two replicas on one GPU: report, go on
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"  {name:54s} failed: {type(exc).__name__}: {first}", flush=True)
    ray.shutdown()


def _next_token_loss(logits, batch):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.input_ids[:, 1:].flatten())


def _train_time(backend, batch, repeats: int) -> float:
    """Median seconds of one Adam step after a first (untimed) step that allocates the optimizer state."""
    from interplab.engine import AdamConfig

    with backend.trainer(AdamConfig(lr=1e-6)) as trainer:
        trainer.step(batch, _next_token_loss)
        return _median_time(lambda: trainer.step(batch, _next_token_loss), repeats)


def _sweep(backend, pairs):
    """One timed resid_pre sweep (after a warm-up): (seconds, result)."""
    from interplab.analyses.patching import Sweep, activation_patching

    activation_patching(backend, pairs, [Sweep("resid_pre")])  # warm-up
    start = time.perf_counter()
    result = activation_patching(backend, pairs, [Sweep("resid_pre")])
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
