"""A stage's parameters: which full-model names it holds, setting them, and its own Adam.

Every stage holds its own layers' parameters (the first also the embedding, the last the final norm
and head; with tied embeddings the first and last stages each hold a copy, see
:meth:`~interplab.models.arch.base.ArchSpec.tied_names`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from interplab.engine.hooked import HookedModel
    from interplab.engine.training import AdamConfig
    from interplab.runtime.task import StageSpec


class StageParameters:
    """One stage's parameters by full model name, and the optimizer over the trainable ones."""

    def __init__(self, hooked: HookedModel, spec: StageSpec) -> None:
        self.hooked, self.spec = hooked, spec
        self.optimizer: torch.optim.Adam | None = None
        self.training = False  # init_optimizer called (the optimizer is None when all is frozen)
        self.steps = 0
        self._tie_head_if_whole()

    def owned(self) -> dict[str, torch.nn.Parameter]:
        """This stage's parameters by name: its layers, the embedding (first), final norm and head (last)."""
        spec, arch = self.spec, self.hooked.spec
        base = arch.base + "."
        out = {}
        for name, param in self.hooked.model.named_parameters(remove_duplicate=False):
            layer = arch.layer_of_parameter(name)
            if layer is not None:
                keep = spec.start <= layer < spec.stop
            elif name.startswith((base + arch.final_norm + ".", arch.lm_head + ".")):
                keep = spec.last
            elif arch.rotary and name.startswith(base + arch.rotary + "."):
                keep = False
            else:
                keep = spec.first and name.startswith(base)
            if keep and param.device.type != "meta":
                out[name] = param
        return out

    def _tied(self) -> tuple[str, str] | None:
        return self.hooked.spec.tied_names(self.hooked.config)

    def _tie_head_if_whole(self) -> None:
        """A one-stage partial load holds separate embedding and head copies; tie them as the model does."""
        if self.spec.first and self.spec.last and self._tied() is not None:
            arch = self.hooked.spec
            head = self.hooked.model.get_submodule(arch.lm_head)
            embed = self.hooked.base.get_submodule(arch.embed)
            if head.weight is not embed.weight:
                head.weight = embed.weight

    def tied_param(self) -> torch.nn.Parameter | None:
        """The parameter whose gradient is shared with another stage (a tied embedding's copy), or None."""
        if self._tied() is None or (self.spec.first and self.spec.last):
            return None
        arch = self.hooked.spec
        if self.spec.first:
            return self.hooked.base.get_submodule(arch.embed).weight
        if self.spec.last:
            return self.hooked.model.get_submodule(arch.lm_head).weight
        return None

    def aliases(self) -> dict[str, str]:
        """Full model name -> the name this stage holds it under (a tied copy answers to both names)."""
        owned = self.owned()
        out = {name: name for name in owned}
        tied = self._tied()
        if tied is not None:
            head, embed = tied
            if head in owned and embed not in owned:
                out[embed] = head
            elif embed in owned and head not in owned:
                out[head] = embed
        return out

    def names(self) -> list[str]:
        return list(self.owned())

    def values(self) -> dict[str, torch.Tensor]:
        """CPU copies, by name."""
        return {name: p.detach().to("cpu").clone() for name, p in self.owned().items()}

    def set(self, values: Mapping[str, Any]) -> int:
        """Copy ``values`` (full model name -> tensor) into this stage's own parameters; only names this
        stage holds are accepted (both names of a tied copy). Returns the number of distinct
        parameters written; nothing is written when any value is refused."""
        import torch

        owned, aliases = self.owned(), self.aliases()
        targets: dict[int, tuple[Any, str]] = {}
        for name, value in values.items():
            if name not in aliases:
                raise ValueError(
                    f"unknown parameter {name!r} for stage {self.spec.index} (layers {self.spec.start}-{self.spec.stop - 1}); "
                    f"it holds {len(owned)} parameters, e.g. {sorted(owned)[:3]}"
                )
            param = owned[aliases[name]]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"parameter {name!r} has shape {tuple(param.shape)}, got a value of shape {tuple(value.shape)}")
            seen = targets.get(id(param))
            if seen is not None and not torch.equal(seen[0], value):
                raise ValueError(f"{seen[1]!r} and {name!r} are one tied parameter but were given different values")
            targets[id(param)] = (value, name)
        with torch.no_grad():
            for name, value in values.items():
                param = owned[aliases[name]]
                param.copy_(value.to(param.device, param.dtype))
        return len(targets)

    # ------------------------------------------------------------------ optimizer
    def init_optimizer(self, adam: AdamConfig, trainable: Sequence[str] | None = None) -> int:
        """A fresh Adam over this stage's trainable parameters; returns how many it covers.

        ``trainable`` holds full model names (None: all); names held by other stages are ignored (the
        pipeline checks each exists somewhere). Every other parameter of this stage gets
        ``requires_grad`` False until the next ``init_optimizer``/``release_optimizer``. A tied
        embedding trains when either of its names is listed, on both stages."""
        owned, aliases = self.owned(), self.aliases()
        if trainable is None:
            keep = set(owned)
        else:
            keep = {aliases[n] for n in trainable if n in aliases}
            tied = self._tied()
            if tied is not None and keep & set(tied):
                keep |= set(tied) & set(owned)
        params: dict[int, torch.nn.Parameter] = {}
        for name, param in owned.items():
            param.requires_grad_(name in keep)
            if name in keep:
                params[id(param)] = param
        self.optimizer = adam.optimizer(list(params.values())) if params else None
        self.training = True
        self.steps = 0
        return len(params)

    def release_optimizer(self) -> int:
        """Drop the optimizer and its state; every parameter requires grad again. Returns the count."""
        owned = self.owned()
        for param in owned.values():
            param.requires_grad_(True)
        self.optimizer = None
        self.training = False
        return len(owned)

    def trained(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]] if self.optimizer else []

    def tied_grad(self) -> torch.Tensor | None:
        param = self.tied_param()
        if param is None or param.grad is None:
            return None
        return param.grad.detach().to("cpu")

    def add_tied_grad(self, other: torch.Tensor | None) -> bool:
        """Add the other stage's gradient of the tied embedding (as one process would accumulate it)."""
        param = self.tied_param()
        if param is not None and other is not None:
            if param.grad is None:
                param.grad = other.to(param.device).clone()
            else:
                param.grad.add_(other.to(param.device))
        return True

    def step(self) -> int:
        if not self.training:
            raise RuntimeError("no optimizer: call init_optimizer first")
        if self.optimizer is not None:  # None: every parameter of this stage is frozen
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return self.steps
