"""Data-parallel training steps over the replicas of a pipeline.

A step's batch is split into micro-batches, and each replica runs a contiguous share of them
forward (keeping its stages' autograd graphs). The loss must see the whole batch to equal the
single-process step (a token-weighted mean is not the mean of the replicas' means), so the driver
gathers every replica's logits, evaluates ``loss_fn`` once, and sends each replica the gradient of
its own rows' logits; each replica runs the backward pass through its stages from there. Then every
stage index all-reduces its parameters' gradients over the replicas, directly between the stage
actors (a torch.distributed group per stage index: NCCL on GPUs, Gloo on CPU; see
:mod:`interplab.runtime.collective`; every replica gets the same bits, so their Adam steps stay
bit-identical), and the tied embedding's copies are combined inside each replica as in a one-replica
step.

The logits travel through the driver (``rows x positions x vocab`` per step): fine for the batches a
grafting finetune uses; a loss that decomposes over rows could be evaluated on each replica instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from interplab.engine.interventions import Intervention
from interplab.engine.results import Metric
from interplab.engine.tokens import TokenBatch
from interplab.runtime.microbatch import row_ranges, splittable
from interplab.runtime.scheduler import Flight

if TYPE_CHECKING:
    from interplab.runtime.scheduler import Scheduler


def replicated_backward(
    scheduler: Scheduler, batch: TokenBatch, loss_fn: Metric, interventions: Sequence[Intervention]
) -> torch.Tensor:
    """Forward and backward ``batch`` over all of the scheduler's replicas and all-reduce the parameter
    gradients; returns the loss. The caller combines tied copies and steps the optimizers."""
    import ray

    replicas = scheduler.replicas
    call = scheduler.new_call()
    wanted = (scheduler.parallel.micro_batches or 2 * scheduler.n_stages) * len(replicas)  # per replica as in one
    parts = row_ranges(batch.size, wanted) if splittable(interventions) else [(0, batch.size)]
    shares = [list(range(a, b)) for a, b in row_ranges(len(parts), len(replicas))]
    flights, logits_refs = [], []
    for replica, mbs in enumerate(shares):
        for mb in mbs:
            lo, hi = parts[mb]
            tasks = scheduler.chain_tasks(
                call, mb, batch, lo, hi, mode="train", capture=[], interventions=interventions, positions=None, logits="all"
            )
            flight = Flight(mb, tasks, replica)
            scheduler.submit(flight)
            flights.append(flight)
        logits_refs.append(replicas[replica].actors[-1].outputs.remote(call, mbs))
    try:
        ray.get([side for f in flights for side in f.sides])
        logits = torch.cat(ray.get(logits_refs)).requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(logits, batch)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, logits)
        grad_refs = []
        for replica, mbs in enumerate(shares):
            lo, hi = parts[mbs[0]][0], parts[mbs[-1]][1]
            actors = replicas[replica].actors
            out = actors[-1].backward_outputs.options(num_returns=len(mbs) + 1).remote(call, mbs, grad[lo:hi])
            refs = list(out[1:])
            for stage in range(scheduler.n_stages - 2, -1, -1):
                refs = [actors[stage].backward.options(num_returns=2).remote(call, mb, ref)[0] for mb, ref in zip(mbs, refs)]
            grad_refs += refs
        ray.get(grad_refs)
        ray.get([actor.all_reduce_grads.remote() for replica in replicas for actor in replica.actors])
    except Exception:
        for handle in replicas:
            for actor in handle.actors:
                actor.drop.remote(call)
        raise
    return loss.detach()
