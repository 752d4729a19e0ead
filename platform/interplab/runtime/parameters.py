"""Stage parameters of a :class:`~interplab.runtime.pipeline.PipelineModel`: names, values, optimizers.

Every stage holds its own layers' parameters (the first also the embedding, the last the final norm
and head; a tied embedding has a copy on each). The driver addresses them by the single-process
model's names and sends each value only to the stages holding it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interplab.runtime import cluster
from interplab.runtime.stage import AdamConfig


class PipelineParameters:
    """The parameter side of a pipeline (mixed into ``PipelineModel``: uses its replicas and config)."""

    def _tied_names(self) -> tuple[str, str] | None:
        """``(head name, embedding name)`` when the model ties them."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return None
        return f"{self.spec.lm_head}.weight", f"{self.spec.base}.{self.spec.embed}.weight"

    def _stage_names(self) -> list[list[str]]:
        """Full model names of the parameters each stage holds (asked once: the split is fixed)."""
        import ray

        if self._names is None:
            self._names = ray.get([a.parameter_names.remote() for a in self._replicas[0].actors])
        return self._names

    def parameter_names(self) -> list[str]:
        """Every parameter's name as the single-process model's ``named_parameters()`` gives it (a tied
        head appears once, under the embedding's name)."""
        names = list(dict.fromkeys(n for part in self._stage_names() for n in part))
        tied = self._tied_names()
        if tied is not None and tied[1] in names:
            names = [n for n in names if n != tied[0]]
        return names

    def _owners(self, name: str) -> list[int]:
        """Stages holding ``name`` (a tied embedding: the stages holding either copy); ValueError if none."""
        names = [name]
        tied = self._tied_names()
        if tied is not None and name in tied:
            names = list(tied)
        stages = [i for i, part in enumerate(self._stage_names()) if any(n in part for n in names)]
        if not stages:
            known = self.parameter_names()
            raise ValueError(f"unknown parameter {name!r}: the model has {len(known)} parameters, e.g. {known[:3]}")
        return stages

    def set_parameters(self, values: dict[str, torch.Tensor]) -> int:
        """Copy ``values`` (full model name -> tensor; any subset) into the stages that hold them, on
        every replica. A tied embedding's value (under either name) goes to both of its copies.
        Returns the number of names set; an unknown name is a ValueError and nothing is written."""
        import ray

        per_stage: list[dict[str, torch.Tensor]] = [{} for _ in range(self.n_stages)]
        for name, value in values.items():
            for stage in self._owners(name):
                per_stage[stage][name] = value.detach().to("cpu")
        refs = []
        for replica in self._replicas:
            for actor, part in zip(replica.actors, per_stage):
                if part:
                    refs.append(actor.set_parameters.remote(part))
        try:
            ray.get(refs)
        except Exception as exc:  # noqa: BLE001
            raise cluster.unwrap(exc) from None
        return len(values)

    def _init_optimizer(self, adam: AdamConfig, trainable: Sequence[str] | None = None) -> None:
        """A fresh Adam on every stage over the ``trainable`` parameters (full names; None: all); every
        other parameter gets ``requires_grad`` False until :meth:`_release_optimizer` or the next call."""
        import ray

        if trainable is not None:
            trainable = list(trainable)
            if not trainable:
                raise ValueError("trainable is empty: no parameter would be trained")
            for name in trainable:
                self._owners(name)
        try:
            ray.get([a.init_optimizer.remote(adam, trainable) for replica in self._replicas for a in replica.actors])
            if len(self._replicas) > 1:
                self._join_grad_groups()
        except Exception as exc:  # noqa: BLE001
            raise cluster.unwrap(exc) from None
        self._steps = 0

    def _join_grad_groups(self) -> None:
        """One process group per stage index over the replicas (rank = replica), for the gradient
        all-reduce of data-parallel training (:mod:`interplab.runtime.collective`)."""
        import ray

        addresses = ray.get([self._replicas[0].actors[s].grad_group_address.remote() for s in range(self.n_stages)])
        world = len(self._replicas)
        ray.get([replica.actors[s].join_grad_group.remote(addresses[s], rank, world)
                 for rank, replica in enumerate(self._replicas) for s in range(self.n_stages)])

    def _release_optimizer(self) -> None:
        """Drop every stage's optimizer state and make all parameters require grad again."""
        import ray

        ray.get([a.release_optimizer.remote() for replica in self._replicas for a in replica.actors])

    def stage_parameters(self, replica: int = 0) -> dict[str, torch.Tensor]:
        """All stages' parameters (CPU copies, by name; a tied head appears under its own name)."""
        import ray

        out: dict[str, torch.Tensor] = {}
        for part in ray.get([a.parameters.remote() for a in self._replicas[replica].actors]):
            out.update(part)
        return out
