"""How a job gets its model: the one place that turns a spec into a model.

:func:`build_model` is called by Ray workers: ``interplab.runtime.build_backend`` gives the
single-process engine (``parallel`` unset, or one stage and one replica) or a Ray pipeline of stage
actors (``parallel: {stages: 2, gpus_per_stage: 1}``), which the worker then drives.
:func:`validation_model` is what the driver validates against: the tokenizer and config, with the
weights of one layer at most (so a head node never materialises a large model).

A served model (``model: serve://NAME`` with ``service: {url, token_env}``) is never loaded: both
functions return a :class:`~interplab.serve.RemoteModel` on the service, and
:func:`service_provenance` says which service, weights and user the run used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interplab.jobs.errors import SpecError
from interplab.jobs.spec import SERVE_SCHEME

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.engine.hooked import HookedModel
    from interplab.jobs.spec import JobSpec
    from interplab.serve.remote import RemoteModel


def served_name(spec: JobSpec) -> str | None:
    """The served name of ``model: serve://NAME``; None for a model the job loads itself."""
    return spec.model.removeprefix(SERVE_SCHEME) if spec.model.startswith(SERVE_SCHEME) else None


def connect_served(spec: JobSpec) -> RemoteModel:
    """The served model ``spec.model`` names, on ``spec.service`` (errors name the spec field to fix)."""
    import os

    from interplab.serve import AuthError, ServiceError, UnknownModelError, connect

    name, service = served_name(spec), spec.service
    if name is None or service is None:
        raise SpecError("model", "not a served model", spec.model, "serve://NAME with a service: {url, token_env} block")
    token = os.environ.get(service.token_env)
    if not token:
        raise SpecError(
            "service.token_env",
            f"${service.token_env} is not set: export the bearer token the service gave you",
            service.token_env,
            "the name of an environment variable holding your token",
        )
    session = connect(service.url, token=token)
    try:
        return session.model(name)
    except AuthError as exc:
        session.close()
        raise SpecError(
            "service.token_env", f"the service refused the token in ${service.token_env}: {exc}", service.token_env
        ) from None
    except UnknownModelError as exc:
        session.close()
        raise SpecError("model", str(exc), spec.model, "serve://NAME of a model served there (interplab serve list)") from None
    except ServiceError as exc:
        session.close()
        raise SpecError(
            "service.url", f"cannot use the service: {exc}", service.url, "Serve's HTTP address, e.g. http://HEAD:8000"
        ) from None


def service_provenance(model: object) -> dict[str, object]:
    """``{"service": {url, name, model, weight_hash, user, stage_ranges}}`` for a served model, else ``{}``.

    ``user`` is the name the service knows the token by: the run's owner."""
    from interplab.serve.remote import RemoteModel

    if not isinstance(model, RemoteModel):
        return {}
    return {
        "service": {
            "url": model.session.url,
            "name": model.served_name,
            "model": model.name,
            "source": model.info.get("source"),
            "weight_hash": model.weight_hash,
            "user": model.user,
            "dtype": model.info.get("dtype"),
            "stage_ranges": [list(r) for r in model.stage_ranges],
        }
    }


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


def check_stage_split(spec: JobSpec, model: HookedModel | RemoteModel) -> None:
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
    if served_name(spec) is not None:
        return connect_served(spec)
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


def validation_model(spec: JobSpec) -> HookedModel | RemoteModel:
    """Tokenizer + config (+ one layer's weights) of ``spec.model`` (a served model: the service's
    model itself); raises SpecError at ``model`` (or ``service``)."""
    if served_name(spec) is not None:
        return connect_served(spec)
    from interplab.models.loading import ModelLoadError, load_model
    from interplab.models.tiny import TINY_PREFIX

    try:
        if spec.model.startswith(TINY_PREFIX):
            return load_model(spec.model, dtype=spec.dtype, seed=spec.seed)
        return load_model(spec.model, dtype=spec.dtype, seed=spec.seed, layers=(0, 1), with_embed=False, with_head=False)
    except ModelLoadError as exc:
        raise SpecError("model", str(exc), spec.model, "smollm2-135m, tiny-<family>, a model folder or .gguf file") from None
