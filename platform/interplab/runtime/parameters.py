"""A pipeline's weights: every stage's parameters by the single-process model's names, and its optimizers.

Every stage holds its own layers' parameters (the first also the embedding, the last the final norm
and head; a tied embedding has a copy on each). The driver addresses them by the single-process
model's names and sends each value only to the stages holding it, on every replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from interplab.engine.training import AdamConfig
from interplab.runtime.errors import reraise

if TYPE_CHECKING:
    from interplab.models.arch.base import ArchSpec
    from interplab.runtime.scheduler import Scheduler


class PipelineWeights:
    """Names, values and optimizers of the parameters of a pipeline's stage actors."""

    def __init__(self, scheduler: Scheduler, arch: ArchSpec, config: Any) -> None:
        self.scheduler = scheduler
        self.tied = arch.tied_names(config)  # (head, embedding) names when the model ties them
        self._names: list[list[str]] | None = None

    def stage_names(self) -> list[list[str]]:
        """Full model names of the parameters each stage holds (asked once: the split is fixed)."""
        import ray

        if self._names is None:
            self._names = ray.get([a.parameter_names.remote() for a in self.scheduler.replicas[0].actors])
        return self._names

    def names(self) -> list[str]:
        """Every parameter's name as the single-process model's ``named_parameters()`` gives it (a tied
        head appears once, under the embedding's name)."""
        names = list(dict.fromkeys(n for part in self.stage_names() for n in part))
        if self.tied is not None and self.tied[1] in names:
            names = [n for n in names if n != self.tied[0]]
        return names

    def owners(self, name: str) -> list[int]:
        """Stages holding ``name`` (a tied embedding: the stages holding either copy); ValueError if none."""
        names = list(self.tied) if self.tied is not None and name in self.tied else [name]
        stages = [i for i, part in enumerate(self.stage_names()) if any(n in part for n in names)]
        if not stages:
            known = self.names()
            raise ValueError(f"unknown parameter {name!r}: the model has {len(known)} parameters, e.g. {known[:3]}")
        return stages

    def set(self, values: Mapping[str, torch.Tensor]) -> int:
        """Copy ``values`` (full model name -> tensor; any subset) into the stages that hold them, on
        every replica. A tied embedding's value (under either name) goes to both of its copies.
        Returns the number of names set; an unknown name is a ValueError and nothing is written."""
        import ray

        per_stage: list[dict[str, torch.Tensor]] = [{} for _ in range(self.scheduler.n_stages)]
        for name, value in values.items():
            for stage in self.owners(name):
                per_stage[stage][name] = value.detach().to("cpu")
        refs = []
        for replica in self.scheduler.replicas:
            for actor, part in zip(replica.actors, per_stage):
                if part:
                    refs.append(actor.set_parameters.remote(part))
        try:
            ray.get(refs)
        except Exception as exc:  # noqa: BLE001
            reraise(exc)
        return len(values)

    def values(self, replica: int = 0) -> dict[str, torch.Tensor]:
        """All stages' parameters (CPU copies, by name; a tied head appears under its own name too)."""
        import ray

        out: dict[str, torch.Tensor] = {}
        for part in ray.get([a.parameters.remote() for a in self.scheduler.replicas[replica].actors]):
            out.update(part)
        return out

    def get(self) -> dict[str, torch.Tensor]:
        """Every parameter by :meth:`names` (CPU copies)."""
        values = self.values()
        return {name: values[name] for name in self.names()}

    # ------------------------------------------------------------------ optimizers
    def init_optimizer(self, adam: AdamConfig, trainable: Sequence[str] | None = None) -> None:
        """A fresh Adam on every stage over the ``trainable`` parameters (full names; None: all); every
        other parameter gets ``requires_grad`` False until :meth:`release_optimizer` or the next call.
        With several replicas, each stage index joins a gradient group over them."""
        import ray

        if trainable is not None:
            trainable = list(trainable)
            if not trainable:
                raise ValueError("trainable is empty: no parameter would be trained")
            for name in trainable:
                self.owners(name)
        replicas = self.scheduler.replicas
        try:
            ray.get([a.init_optimizer.remote(adam, trainable) for replica in replicas for a in replica.actors])
            if len(replicas) > 1:
                self._join_grad_groups()
        except Exception as exc:  # noqa: BLE001
            reraise(exc)

    def _join_grad_groups(self) -> None:
        """One process group per stage index over the replicas (rank = replica), for the gradient
        all-reduce of data-parallel training (:mod:`interplab.runtime.collective`)."""
        import ray

        replicas = self.scheduler.replicas
        n_stages = self.scheduler.n_stages
        addresses = ray.get([replicas[0].actors[s].grad_group_address.remote() for s in range(n_stages)])
        world = len(replicas)
        ray.get(
            [
                replica.actors[s].join_grad_group.remote(addresses[s], rank, world)
                for rank, replica in enumerate(replicas)
                for s in range(n_stages)
            ]
        )

    def release_optimizer(self) -> None:
        """Drop every stage's optimizer state and make all parameters require grad again."""
        import ray

        ray.get([a.release_optimizer.remote() for replica in self.scheduler.replicas for a in replica.actors])
