"""How a job gets its model: the one place that turns a spec into a model.

:func:`build_model` is called by Ray workers: ``interplab.runtime.build_backend`` gives the
single-process engine (``parallel`` unset, or one stage and one replica) or a Ray pipeline of stage
actors (``parallel: {stages: 2, gpus_per_stage: 1}``), which the worker then drives.
:func:`validation_model` is what the driver validates against: the tokenizer and config, with the
weights of one layer at most (so a head node never materialises a large model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interplab.jobs.errors import SpecError

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.engine.hooked import HookedModel
    from interplab.jobs.spec import JobSpec


def check_parallel(spec: JobSpec) -> None:
    """Validate ``spec.parallel`` as the runtime's ``ParallelConfig`` (errors at ``parallel.<field>``)."""
    if spec.parallel is None:
        return
    from pydantic import ValidationError

    from interplab.jobs.spec import format_validation_error
    from interplab.runtime import ParallelConfig

    try:
        ParallelConfig.model_validate(spec.parallel)
    except ValidationError as exc:
        first = format_validation_error(exc, ParallelConfig, spec.parallel).errors[0]
        raise SpecError(f"parallel.{first.path}", first.problem, first.value, first.allowed) from None


def check_stage_split(spec: JobSpec, model: HookedModel) -> None:
    """The stages ``spec.parallel`` asks for fit the model's layers (errors at ``parallel.stages``).

    Asks :func:`interplab.runtime.split.resolve_stages` itself (an explicit split must end at the last
    layer, a count must not exceed the layers); ``stages: auto`` depends on the devices the stages
    get, so it is resolved on the cluster."""
    if spec.parallel is None:
        return
    from interplab.runtime import ParallelConfig
    from interplab.runtime.split import resolve_stages

    config = ParallelConfig.model_validate(spec.parallel)
    if config.stages == "auto":
        return
    try:
        resolve_stages(config, model.n_layers)
    except ValueError as exc:
        problem = str(exc).removeprefix("stages: ")  # the path already says it
        raise SpecError(
            "parallel.stages",
            problem,
            spec.parallel.get("stages"),
            f"at most {model.n_layers} stages, or [start, stop] ranges covering layers 0..{model.n_layers - 1}",
        ) from None


def build_model(spec: JobSpec, device: str) -> Backend:
    """The model a worker runs ``run_chunk``/``finalize`` with (the one switch point for backends)."""
    from interplab.jobs.registry import get_kind
    from interplab.runtime import build_backend

    runner = get_kind(spec.kind).runner
    declared = getattr(runner, "layer_work", None)
    work = (lambda skeleton: declared(spec, skeleton)) if callable(declared) else None
    return build_backend(spec.model, spec.parallel, dtype=spec.dtype, seed=spec.seed, device=device, layer_work=work)


def uses_pipeline(spec: JobSpec) -> bool:
    """True when ``spec.parallel`` asks for stage actors (the worker then only coordinates them)."""
    if spec.parallel is None:
        return False
    from interplab.runtime import ParallelConfig

    return not ParallelConfig.model_validate(spec.parallel).single_process


def validation_model(spec: JobSpec) -> HookedModel:
    """Tokenizer + config (+ one layer's weights) of ``spec.model``; raises SpecError at ``model``."""
    from interplab.models.loading import ModelLoadError, load_model
    from interplab.models.tiny import TINY_PREFIX

    try:
        if spec.model.startswith(TINY_PREFIX):
            return load_model(spec.model, dtype=spec.dtype, seed=spec.seed)
        return load_model(spec.model, dtype=spec.dtype, seed=spec.seed, layers=(0, 1), with_embed=False, with_head=False)
    except ModelLoadError as exc:
        raise SpecError("model", str(exc), spec.model, "smollm2-135m, tiny-<family>, a model folder or .gguf file") from None
