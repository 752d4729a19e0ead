"""Splitting a model's layers into pipeline stages: explicit, even by count, or by memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from interplab.engine.work import LayerWork
from interplab.runtime.config import ParallelConfig, check_ranges


class SplitError(ValueError):
    """A split that cannot work (more stages than layers, a model that does not fit)."""


@dataclass(frozen=True)
class ModelBytes:
    """Parameter bytes of a model: per decoder layer, the embedding (first stage) and the head (last)."""

    layers: tuple[int, ...]
    embed: int
    head: int

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embed + self.head


def model_bytes(hooked) -> ModelBytes:
    """Bytes of each part of a (possibly meta-device) :class:`HookedModel`, from parameter shapes."""
    spec = hooked.spec
    base = spec.base + "."
    per_layer = [0] * hooked.n_layers
    embed = head = 0
    seen: set[int] = set()
    for name, param in hooked.model.named_parameters(remove_duplicate=False):
        size = param.numel() * param.element_size()
        layer = spec.layer_of_parameter(name)
        if layer is not None:
            per_layer[layer] += size
        elif name.startswith((base + spec.final_norm + ".", spec.lm_head + ".")):
            head += size  # a tied head is a separate copy on the last stage
        elif id(param) not in seen:
            embed += size
        seen.add(id(param))
    return ModelBytes(tuple(per_layer), embed, head)


def split_even(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """``n_stages`` contiguous ranges whose sizes differ by at most one (earlier stages get the extra)."""
    if n_stages > n_layers:
        raise SplitError(f"stages: {n_stages} stages for a model with only {n_layers} layers; use at most {n_layers}")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _stage_costs(ranges: Sequence[tuple[int, int]], sizes: ModelBytes) -> list[int]:
    last = len(ranges) - 1
    return [
        sum(sizes.layers[a:b]) + (sizes.embed if i == 0 else 0) + (sizes.head if i == last else 0)
        for i, (a, b) in enumerate(ranges)
    ]


def balance(sizes: ModelBytes, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges minimising the largest stage's bytes (embedding on the first, head on the last)."""
    return balance_work(sizes.layers, n_stages, first=sizes.embed, last=sizes.head)


def balance_work(work: Sequence[float], n_stages: int, *, first: float = 0, last: float = 0) -> list[tuple[int, int]]:
    """Contiguous ranges minimising the largest stage's total ``work`` (one value per layer), with
    ``first`` added to the first stage and ``last`` to the last (embedding, head).

    Exact dynamic programme over split points: O(stages * layers^2), trivial for real layer counts.
    """
    n = len(work)
    if n_stages > n:
        raise SplitError(f"stages: {n_stages} stages for a model with only {n} layers; use at most {n}")
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    inf = float("inf")

    def cost(stage: int, a: int, b: int) -> float:
        extra = (first if stage == 0 else 0) + (last if stage == n_stages - 1 else 0)
        return prefix[b] - prefix[a] + extra

    # best[k][j]: minimal max cost of splitting layers [0, j) into k stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(k - 1, i, j))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    out, j = [], n
    for k in range(n_stages, 0, -1):
        i = choice[k][j]
        out.append((i, j))
        j = i
    return out[::-1]


def split_by_memory(
    sizes: ModelBytes, capacity: int, *, headroom: float = 0.8, max_stages: int | None = None
) -> list[tuple[int, int]]:
    """The fewest stages whose parameters fit in ``headroom * capacity`` bytes each, balanced.

    ``headroom`` leaves room for activations, the autograd graph and allocator slack.
    """
    budget = int(capacity * headroom)
    n = len(sizes.layers)
    limit = min(n, max_stages or n)
    for k in range(1, limit + 1):
        ranges = balance(sizes, k)
        if max(_stage_costs(ranges, sizes)) <= budget:
            return ranges
    largest = max(sizes.layers) + max(sizes.embed, sizes.head)
    raise SplitError(
        f"stages: auto: the model ({sizes.total / 2**30:.2f} GiB of parameters) does not fit in {limit} stages "
        f"of {budget / 2**30:.2f} GiB ({headroom:.0%} of {capacity / 2**30:.2f} GiB free per device); "
        f"the largest indivisible part needs {largest / 2**30:.2f} GiB; use more GPUs per stage or a smaller dtype"
    )


def device_capacity(gpus_per_stage: float) -> int:
    """Free bytes a stage may use: free GPU memory times its GPU share, or available host memory on CPU."""
    import torch

    if gpus_per_stage > 0 and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * min(gpus_per_stage, 1.0) * max(1.0, gpus_per_stage))
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_stages(
    config: ParallelConfig,
    n_layers: int,
    sizes: ModelBytes | None = None,
    capacity: int | None = None,
    work: LayerWork | None = None,
) -> list[tuple[int, int]]:
    """The stage layer ranges ``config.stages`` asks for on a model with ``n_layers`` layers.

    ``work`` (the relative compute of what will run) balances a stage count when ``config.balance``
    is ``"work"``; without it a count splits the layers evenly.
    """
    stages = config.stages
    if isinstance(stages, list):
        return check_ranges(stages, n_layers)
    if stages == "auto":
        if sizes is None:
            raise SplitError("stages: auto needs the model's parameter sizes")
        cap = capacity if capacity is not None else device_capacity(config.gpus_per_stage)
        return split_by_memory(sizes, cap)
    if work is not None and config.balance == "work":
        if len(work.layers) != n_layers:
            raise SplitError(f"layer work gives {len(work.layers)} layers for a model with {n_layers}")
        return balance_work(work.layers, stages, first=work.first, last=work.last)
    return split_even(n_layers, stages)
