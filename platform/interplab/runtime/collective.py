"""Gradient all-reduce between the data-parallel replicas of one pipeline stage.

In data-parallel training every replica's stage ``s`` holds the same parameters and computes their
gradients on its own rows; before the optimizer step they must all hold the sum. The stage actors of
one stage index form a ``torch.distributed`` process group (rank = replica index) and all-reduce
their gradients directly between themselves: NCCL between GPU stages, Gloo on CPU. Nothing passes
through the driver or Ray's object store, and each process sends and receives about twice its
gradient bytes per step whatever the replica count (ring all-reduce), where gathering every
replica's gradients would move ``replicas`` times as much.

torch.distributed rather than ``ray.util.collective``: the latter's NCCL backend needs CuPy, and its
group registry keeps a detached named actor per group that is never reclaimed, which a shared
cluster should not accumulate. The rendezvous is plain TCP: the driver asks replica 0's actor for a
free port on its node and gives that address to every member.

Every member gets the same reduced bits (a ring all-reduce reduces each chunk on one rank and copies
it to the others), so the replicas' Adam steps stay bit-identical. A parameter with no gradient on
any replica keeps ``grad = None`` (Adam skips it, as the single process would); one that has a
gradient on some replicas gets the sum, counting the others as zero.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta

import torch

TIMEOUT = timedelta(minutes=10)
BUCKET_BYTES = 64 << 20  # gradients are flattened into buckets of about this size


def free_address() -> str:
    """``host:port`` of a free TCP port on this node, for a process group's rendezvous."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join(address: str, rank: int, world: int, device: torch.device) -> None:
    """Join the stage's process group (leaving any earlier one first). Blocks until all have joined."""
    import torch.distributed as dist

    leave()
    dist.init_process_group(backend_for(device), init_method=f"tcp://{address}", rank=rank, world_size=world, timeout=TIMEOUT)


def leave() -> None:
    if joined():
        import torch.distributed as dist

        dist.destroy_process_group()


def joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_grads(params: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum ``params``' gradients over the group in place; returns how many gradients were summed."""
    import torch.distributed as dist

    if not params:
        return 0
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)  # which parameters have a gradient on some replica
    summed = [p for p, n in zip(params, present.tolist()) if n > 0]
    for param in summed:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for bucket in _buckets(summed, bucket_bytes):
        grads = [p.grad for p in bucket if p.grad is not None]  # every summed parameter has one (set above)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        start = 0
        for grad in grads:
            grad.copy_(flat[start : start + grad.numel()].view_as(grad))
            start += grad.numel()
    return len(summed)


def _buckets(params: Sequence[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of ``params`` of one dtype, each about ``limit`` bytes (bounds the extra memory)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        if not out or size + nbytes > limit or out[-1][-1].dtype != param.dtype:
            out.append([])
            size = 0
        out[-1].append(param)
        size += nbytes
    return out
