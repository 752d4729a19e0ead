"""One pipeline stage: layers ``[start, stop)`` of a model (embedding on the first, head on the last).

:class:`StageWorker` is a plain class (unit-testable without Ray); :func:`stage_actor_class` wraps
it as a Ray actor. Its methods are written out (Ray handles do not delegate ``__getattr__``) and
every failure inside one is re-raised as a single :class:`StageError` naming the stage, its layers
and the micro-batch's prompts.

Backward passes cross stages GPipe style: ``forward`` in ``grad``/``train`` mode keeps the stage's
autograd graph keyed by ``(call, micro-batch)``; the last stage's ``finish`` evaluates the metric
(or loss) on the logits of all micro-batches of the call and returns the gradient of each
micro-batch's input boundary; every earlier stage's ``backward`` turns the gradient of its output
into that of its input (and of its own sites, or of its parameters when training).
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from interplab.runtime.errors import StageError
from interplab.runtime.sink import StoreSink, marker_table, write_stage_chunk

Mode = Literal["run", "grad", "train"]


@dataclass(frozen=True)
class StageSpec:
    """What a stage actor loads: model, layer range, dtype, device."""

    index: int
    start: int
    stop: int
    n_layers: int
    n_stages: int
    model: str
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.n_layers


@dataclass
class StageTask:
    """One micro-batch's work for one stage (only the captures/interventions this stage owns)."""

    call: int
    mb: int
    prompt_ids: list[int]
    batch: Any  # TokenBatch (rows of this micro-batch, padded to the whole batch's length)
    mode: Mode = "run"
    capture: list = field(default_factory=list)
    interventions: list = field(default_factory=list)
    grad_sites: list = field(default_factory=list)
    positions: Any = None
    logits: str = "all"
    stop: int | None = None  # run only up to this layer (the last layer a capture needs)
    with_head: bool = False
    emit: bool = True  # return the output (False: nothing downstream needs it)
    sink: StoreSink | None = None
    tokens: list[list[str]] | None = None
    keep_on_device: bool = False  # return the output on the stage's device (a compiled graph sends it by NCCL)
    start: int | None = None  # first layer to run (None: the stage's first); rows may start mid-model
    joins: dict | None = None  # layer -> resid_pre rows joining the batch there (HookedModel.run_stage)
    prefix: Any = None  # KVPrefix of this stage's layers: cached keys/values of the first positions
    vocab: Any = None  # Long[k]: the head computes only these logits columns
    keep_kv: bool = False  # also return the stage's keys/values: side result (captures, {layer: (k, v)})
    hidden: Any = None  # the input of a chain's first stage when its rows start mid-model with hidden states
    threads: int | None = None  # CPU threads for this task (None: the stage's own); see pipeline fill and drain


@dataclass(frozen=True)
class AdamConfig:
    """``torch.optim.Adam`` settings, one optimizer per stage (each keeps its own state)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


def _stage_errors(method: Callable) -> Callable:
    """Re-raise any exception as one picklable StageError naming this stage and the prompts."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the error boundary
            task = next((a for a in args if isinstance(a, StageTask)), None)
            ids = task.prompt_ids if task is not None else list(self._prompt_ids_of(args))
            raise StageError(
                self.spec.index, (self.spec.start, self.spec.stop), ids, type(exc).__name__, str(exc), traceback.format_exc()
            ) from None

    return wrapper


def _input_grad(hidden, grad):
    """The gradient of a micro-batch's input boundary for the previous stage (CPU): ``grad``, zeros
    where no gradient reached the input, None when the stage had no input (the first stage)."""
    if hidden is None:
        return None
    import torch

    return (grad if grad is not None else torch.zeros_like(hidden)).detach().to("cpu")


def _emitted(task: StageTask, output):
    """What a stage passes on: its detached output (on its device for a compiled graph's NCCL
    transfer, else on CPU), or None when nothing downstream needs it."""
    if not task.emit:
        return None
    return output.detach() if task.keep_on_device else output.detach().to("cpu")


class StageWorker:
    """Holds one stage's weights and runs its part of every pipeline call."""

    def __init__(self, spec: StageSpec) -> None:
        import torch

        from interplab.models.loading import load_model

        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.device = torch.device(spec.device)
        self.hooked = load_model(
            spec.model, dtype=spec.dtype, seed=spec.seed, device=spec.device,
            layers=(spec.start, spec.stop), with_embed=spec.first, with_head=spec.last,
        )
        self.hooked.model.to(self.device) if spec.model.startswith("tiny-") else None
        self._pending: dict[tuple[int, int], tuple[Any, Any, StageTask]] = {}
        self._call_prompts: dict[int, list[int]] = {}
        self._writers: dict[tuple[str, str], Any] = {}
        self._optimizer = None
        self._training = False  # init_optimizer called (the optimizer is None when all is frozen)
        self.steps = 0
        self._tie_head_if_whole()

    # ------------------------------------------------------------------ bookkeeping
    def ping(self) -> tuple[int, int]:
        """``(pid, optimizer steps taken)``: liveness, and whether a restart lost training state."""
        return os.getpid(), self.steps

    def _prompt_ids_of(self, args) -> list[int]:
        call = next((a for a in args if isinstance(a, int)), None)
        return self._call_prompts.get(call, [])

    def drop(self, call: int) -> None:
        """Forget the kept graphs of a call (after a failure elsewhere in the pipeline)."""
        for key in [k for k in self._pending if k[0] == call]:
            del self._pending[key]
        self._call_prompts.pop(call, None)

    # ------------------------------------------------------------------ forward
    @_stage_errors
    def forward(self, task: StageTask, hidden):
        """Run this stage on a micro-batch; return ``(output for the next stage, side result)``.

        The side result is the stage's captures (an :class:`ActivationCache` on CPU), or the number
        of rows written when the task carries a store sink.
        """
        if task.threads is None or task.threads == self.spec.threads:
            return self._forward(task, hidden)
        import torch

        torch.set_num_threads(task.threads)
        try:
            return self._forward(task, hidden)
        finally:
            torch.set_num_threads(max(1, self.spec.threads))

    def _forward(self, task: StageTask, hidden):
        hidden = task.hidden if hidden is None else hidden
        if hidden is not None:
            hidden = hidden.to(self.device)
            if task.mode != "run":
                hidden = hidden.detach().requires_grad_(True)
        spec = self.spec
        start = task.start if task.start is not None else spec.start
        stop = task.stop if task.stop is not None else spec.stop
        if task.joins:  # rows join at later layers: forward only (HookedModel.run_stage checks the rest)
            output, _ = self.hooked.run_stage(
                task.batch, start=start, stop=stop, hidden=hidden, with_head=task.with_head, joins=task.joins,
                interventions=task.interventions, logits=task.logits, prefix=task.prefix, vocab=task.vocab,
            )
            return _emitted(task, output), None
        stage = self.hooked.stage_pass(
            task.batch, start=start, stop=stop, hidden=hidden, with_head=task.with_head,
            capture=task.capture, interventions=task.interventions, grad_sites=task.grad_sites,
            positions=task.positions, logits=task.logits, grad=task.mode != "run",  # keep the graph on every stage
            prefix=task.prefix, vocab=task.vocab, keep_kv=task.keep_kv,
        )
        cache = stage.cache
        if task.mode != "run":
            self._pending[(task.call, task.mb)] = (hidden, stage, task)
            self._call_prompts.setdefault(task.call, []).extend(task.prompt_ids)
            cache = cache.to("cpu")
            cache = type(cache)({k: v.detach() for k, v in cache.items()}, cache.positions, cache.valid)
        else:
            cache = cache.to("cpu")
        out = _emitted(task, stage.output)
        if task.sink is not None:
            return out, self._write(task, cache)
        if task.keep_kv:
            return out, (cache, {layer: (k.to("cpu"), v.to("cpu")) for layer, (k, v) in stage.plan.kv.items()})
        return out, cache

    def _write(self, task: StageTask, cache) -> int:
        from interplab.engine.stream import CaptureChunk

        sink = task.sink
        key = (sink.store_uri, sink.run_id)
        if key not in self._writers:
            from interplab.store import open_store

            self._writers[key] = open_store(sink.store_uri, create=False).resume_run(sink.run_id)
        batch = task.batch
        chunk = CaptureChunk(
            index=sink.chunk, prompt_ids=list(task.prompt_ids), token_ids=batch.input_ids.cpu(),
            lengths=batch.lengths.tolist(), tokens=task.tokens, positions=cache.positions, valid=cache.valid,
            acts=dict(cache.items()),
        )
        return write_stage_chunk(
            self._writers[key], chunk, marker=marker_table(self.spec.start, self.spec.stop),
            with_prompts=self.spec.first, dtype=sink.dtype,
        )

    # ------------------------------------------------------------------ backward
    def _targets(self, key) -> tuple[list, list]:
        hidden, stage, task = self._pending[key]
        sites = list(task.grad_sites)
        tensors = [stage.plan.grad_tensors[s.all_heads()] for s in sites]
        if hidden is not None:
            tensors.append(hidden)
        return sites, tensors

    def _site_grads(self, key, sites, grads):
        _, stage, _ = self._pending[key]
        return self.hooked.site_grads(stage.plan, sites, grads[: len(sites)]).to("cpu")

    @_stage_errors
    def finish(self, call: int, mbs: Sequence[int], batch, fn, mode: Mode):
        """Last stage: evaluate ``fn(logits, batch)`` on all micro-batches of ``call`` and start backward.

        Returns ``[summary, grad_in_0, grad_in_1, ...]``: the summary holds the value, the logits and
        this stage's site gradients per micro-batch; ``grad_in_i`` is the gradient of micro-batch
        ``i``'s input boundary (None on a single-stage pipeline).
        """
        import torch

        keys = [(call, mb) for mb in mbs]
        with torch.enable_grad():
            logits = torch.cat([self._pending[k][1].output for k in keys], dim=0)
            value = fn(logits, batch.to(logits.device))
            if value.numel() != 1:
                raise ValueError(f"the metric must return a scalar, got shape {tuple(value.shape)}")
            targets = [self._targets(k) for k in keys]
            if mode == "train":
                value.backward()
                grads = [[None] * len(s) + ([self._pending[k][0].grad] if self._pending[k][0] is not None else [])
                         for k, (s, _) in zip(keys, targets)]
            else:
                flat = [t for _, ts in targets for t in ts]
                flat_grads = list(torch.autograd.grad(value, flat, allow_unused=True)) if flat else []
                grads, i = [], 0
                for _, ts in targets:
                    grads.append(flat_grads[i : i + len(ts)])
                    i += len(ts)
        site_grads = []
        grad_ins = []
        for k, (sites, ts), g in zip(keys, targets, grads):
            site_grads.append(self._site_grads(k, sites, g) if mode == "grad" else None)
            hidden = self._pending[k][0]
            grad_ins.append(_input_grad(hidden, g[-1] if hidden is not None else None))
            del self._pending[k]
        self._call_prompts.pop(call, None)
        summary = {"value": value.detach().cpu(), "logits": logits.detach().cpu(), "site_grads": site_grads}
        return [summary, *grad_ins]

    @_stage_errors
    def outputs(self, call: int, mbs: Sequence[int]):
        """Last stage, data-parallel training: the logits of micro-batches ``mbs`` of ``call`` (CPU),
        for the driver to evaluate the loss on every replica's rows at once."""
        import torch

        return torch.cat([self._pending[(call, mb)][1].output.detach() for mb in mbs]).to("cpu")

    @_stage_errors
    def backward_outputs(self, call: int, mbs: Sequence[int], grad):
        """Last stage, data-parallel training: backward from ``grad``, the loss gradient of this
        stage's logits for ``mbs`` (rows in order). Returns ``[rows, grad_in_0, grad_in_1, ...]`` as
        :meth:`finish` does."""
        import torch

        keys = [(call, mb) for mb in mbs]
        outs = [self._pending[k][1].output for k in keys]
        parts = torch.split(grad.to(self.device, outs[0].dtype), [o.shape[0] for o in outs])
        live = [(o, g) for o, g in zip(outs, parts) if o.requires_grad]
        if live:
            torch.autograd.backward([o for o, _ in live], [g for _, g in live])
        grad_ins = []
        for k in keys:
            hidden = self._pending[k][0]
            grad_ins.append(_input_grad(hidden, hidden.grad if hidden is not None else None))
            del self._pending[k]
        self._call_prompts.pop(call, None)
        return [int(grad.shape[0]), *grad_ins]

    @_stage_errors
    def backward(self, call: int, mb: int, grad_out):
        """Earlier stage: gradient of this stage's output → ``(grad of its input, its site gradients)``."""
        import torch

        key = (call, mb)
        hidden, stage, task = self._pending[key]
        grad_out = grad_out.to(self.device)
        sites, tensors = self._targets(key)
        if task.mode == "train":
            if stage.output.requires_grad:  # False: nothing on or below this stage trains
                torch.autograd.backward(stage.output, grad_out)
            grads = [None] * len(sites) + ([hidden.grad] if hidden is not None else [])
        else:
            grads = list(torch.autograd.grad(stage.output, tensors, grad_out, allow_unused=True)) if tensors else []
        site_grads = self._site_grads(key, sites, grads) if task.mode == "grad" else None
        grad_in = _input_grad(hidden, grads[-1] if hidden is not None else None)
        del self._pending[key]
        if not any(k[0] == call for k in self._pending):
            self._call_prompts.pop(call, None)
        return grad_in, site_grads

    # ------------------------------------------------------------------ training
    def _owned_parameters(self) -> dict[str, Any]:
        """This stage's parameters by name: its layers, the embedding (first), final norm and head (last)."""
        spec, hooked = self.spec, self.hooked
        arch = hooked.spec
        base = arch.base + "."
        layers = base + arch.layers + "."
        out: dict[str, Any] = {}
        for name, param in hooked.model.named_parameters(remove_duplicate=False):
            if name.startswith(layers):
                keep = spec.start <= int(name[len(layers):].split(".")[0]) < spec.stop
            elif name.startswith((base + arch.final_norm + ".", arch.lm_head + ".")):
                keep = spec.last
            elif arch.rotary and name.startswith(base + arch.rotary + "."):
                keep = False
            else:
                keep = spec.first and name.startswith(base)
            if keep and param.device.type != "meta":
                out[name] = param
        return out

    def _tied(self) -> bool:
        return bool(getattr(self.hooked.config, "tie_word_embeddings", False))

    def _tie_head_if_whole(self) -> None:
        """A one-stage partial load holds separate embedding and head copies; tie them as the model does."""
        if self.spec.first and self.spec.last and self._tied():
            arch = self.hooked.spec
            head = self.hooked.model.get_submodule(arch.lm_head)
            embed = self.hooked.base.get_submodule(arch.embed)
            if head.weight is not embed.weight:
                head.weight = embed.weight

    def _tied_param(self):
        """The parameter whose gradient is shared with another stage (tied embedding), or None."""
        if not self._tied() or (self.spec.first and self.spec.last):
            return None
        arch = self.hooked.spec
        if self.spec.first:
            return self.hooked.base.get_submodule(arch.embed).weight
        if self.spec.last:
            return self.hooked.model.get_submodule(arch.lm_head).weight
        return None

    def _tied_names(self) -> tuple[str, str] | None:
        """``(head name, embedding name)`` when the model ties them (one parameter in the full model)."""
        if not self._tied():
            return None
        arch = self.hooked.spec
        return f"{arch.lm_head}.weight", f"{arch.base}.{arch.embed}.weight"

    def _aliases(self) -> dict[str, str]:
        """Full model name -> the name this stage holds it under (a tied copy answers to both names)."""
        owned = self._owned_parameters()
        out = {name: name for name in owned}
        tied = self._tied_names()
        if tied is not None:
            head, embed = tied
            if head in owned and embed not in owned:
                out[embed] = head
            elif embed in owned and head not in owned:
                out[head] = embed
        return out

    @_stage_errors
    def parameter_names(self) -> list[str]:
        """Full model names of the parameters this stage holds (both names of a tied copy on a whole model)."""
        return list(self._owned_parameters())

    @_stage_errors
    def set_parameters(self, values: dict[str, Any]) -> int:
        """Copy ``values`` (full model name -> tensor) into this stage's own parameters.

        Only names this stage holds are accepted; with tied embeddings the embedding and head names
        both address this stage's copy (both copies of a split pipeline are set when the driver sends
        the value to both stages, as :meth:`PipelineModel.set_parameters` does). Returns the number of
        distinct parameters written.
        """
        import torch

        owned, aliases = self._owned_parameters(), self._aliases()
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

    @_stage_errors
    def init_optimizer(self, adam: AdamConfig, trainable: list[str] | None = None) -> int:
        """A fresh Adam over this stage's trainable parameters; returns how many it covers.

        ``trainable`` holds full model names (None: all); names held by other stages are ignored,
        the pipeline checks that each name exists somewhere. Every other parameter of this stage gets
        ``requires_grad`` False until the next ``init_optimizer``/``release_optimizer``, so nothing
        updates it. A tied embedding trains when either of its names is listed, on both stages.
        """
        import torch

        owned, aliases = self._owned_parameters(), self._aliases()
        if trainable is None:
            keep = set(owned)
        else:
            keep = {aliases[n] for n in trainable if n in aliases}
            tied = self._tied_names()
            if tied is not None and keep & set(tied):
                keep |= set(tied) & set(owned)
        params: dict[int, Any] = {}
        for name, param in owned.items():
            param.requires_grad_(name in keep)
            if name in keep:
                params[id(param)] = param
        self._optimizer = (
            torch.optim.Adam(list(params.values()), lr=adam.lr, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)
            if params else None
        )
        self._training = True
        self.steps = 0
        return len(params)

    @_stage_errors
    def release_optimizer(self) -> int:
        """Drop the optimizer and its state (and leave the replicas' gradient group); every parameter
        requires grad again. Returns the count."""
        from interplab.runtime import collective

        owned = self._owned_parameters()
        for param in owned.values():
            param.requires_grad_(True)
        self._optimizer = None
        self._training = False
        collective.leave()
        return len(owned)

    @_stage_errors
    def tied_grad(self):
        param = self._tied_param()
        if param is None or param.grad is None:
            return None
        return param.grad.detach().to("cpu")

    @_stage_errors
    def add_tied_grad(self, other):
        """Add the other stage's gradient of the tied embedding (as one process would accumulate it)."""
        param = self._tied_param()
        if param is not None and other is not None:
            if param.grad is None:
                param.grad = other.to(param.device).clone()
            else:
                param.grad.add_(other.to(param.device))
        return True

    def _trained(self) -> list:
        return [p for group in self._optimizer.param_groups for p in group["params"]] if self._optimizer else []

    @_stage_errors
    def grad_group_address(self) -> str:
        """A free ``host:port`` on this actor's node, for the replicas' gradient group rendezvous."""
        from interplab.runtime import collective

        return collective.free_address()

    @_stage_errors
    def join_grad_group(self, address: str, rank: int, world: int) -> int:
        """Join this stage index's gradient group (one rank per replica; blocks until all joined)."""
        from interplab.runtime import collective

        collective.join(address, rank, world, self.device)
        return rank

    @_stage_errors
    def all_reduce_grads(self) -> int:
        """Sum the trainable parameters' gradients over the replicas (see :mod:`interplab.runtime.collective`)."""
        from interplab.runtime import collective

        if not collective.joined():
            raise RuntimeError("this stage has not joined a gradient group: the pipeline sets one up in init_optimizer")
        return collective.all_reduce_grads(self._trained())

    @_stage_errors
    def step(self, call: int) -> int:
        if not self._training:
            raise RuntimeError("no optimizer: call init_optimizer first")
        if self._optimizer is not None:  # None: every parameter of this stage is frozen
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.drop(call)
        return self.steps

    @_stage_errors
    def parameters(self) -> dict[str, Any]:
        """This stage's parameters (CPU copies), for checks and checkpoints."""
        return {name: p.detach().to("cpu").clone() for name, p in self._owned_parameters().items()}


def stage_actor_class():
    """The Ray actor class for :class:`StageWorker` (created lazily: importing this module needs no Ray)."""
    import ray

    return ray.remote(StageWorker)
