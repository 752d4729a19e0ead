"""``kind: serve`` specs: what ``interplab serve SPEC.yaml`` deploys, and the arguments of the Serve
application builder (:func:`interplab.serve.deployment.build_app`, used by KubeRay's ``RayService``).

    # jobs/serve/smollm2.yaml
    kind: serve
    model: smollm2-135m
    name: smollm2-135m            # the URL path /smollm2-135m (default: from the model)
    parallel: {stages: 1}         # as in job specs: stages > 1 is a pipeline of stage actors per replica
    replicas: 1                   # Serve replicas, each with its own copy of the weights
    tokens: /etc/interplab/serve-tokens
    limits: {max_rows: 4096}      # see ServeLimits
    batching: {window_ms: 5}      # see BatchingConfig
    resources: {num_cpus: 2, num_gpus: 0}
    http: {host: 0.0.0.0, port: 8000}

Unknown keys are errors naming the field path, like every spec.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from interplab.runtime.config import ParallelConfig
from interplab.serve.auth import TOKENS_ENV
from interplab.serve.limits import BatchingConfig, ServeLimits


class ServeResources(BaseModel):
    """Ray resources of each replica (a pipeline's stage actors ask ``parallel``'s own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)


class ServeHTTP(BaseModel):
    """Where Serve's HTTP proxy listens (only when this deploy starts Serve on the cluster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


class ServeSpec(BaseModel):
    """A served model (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["serve"] = "serve"
    description: str = ""
    model: str
    name: str | None = None
    parallel: ParallelConfig | None = None
    replicas: int = Field(default=1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    tokens: str | None = None
    limits: ServeLimits = ServeLimits()
    batching: BatchingConfig = BatchingConfig()
    resources: ServeResources = ServeResources()
    http: ServeHTTP = ServeHTTP()

    def tokens_path(self) -> str:
        path = self.tokens or os.environ.get(TOKENS_ENV)
        if not path:
            raise ValueError(f"tokens: no tokens path; set tokens: in the spec, pass --tokens, or set ${TOKENS_ENV}")
        return path

    def app_args(self) -> dict[str, Any]:
        """The builder's arguments (``serveConfigV2.applications[].args``)."""
        return {
            "model": self.model,
            "name": self.name,
            "tokens": self.tokens_path(),
            "parallel": self.parallel.model_dump(mode="json") if self.parallel is not None else None,
            "dtype": self.dtype,
            "seed": self.seed,
            "limits": self.limits.model_dump(),
            "batching": self.batching.model_dump(),
        }


class ServeSpecError(ValueError):
    """A serve spec that does not validate: every problem with its field path."""


def parse_serve_spec(raw: object, where: str = "spec") -> ServeSpec:
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        ]
        raise ServeSpecError(f"{where}: invalid serve spec:\n" + "\n".join(problems)) from None


def load_serve_spec(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> ServeSpec:
    """Read a serve spec (duplicate keys refused, ``--set key=value`` overrides applied, as job specs)."""
    from interplab.jobs.spec import load_spec_file

    raw = load_spec_file(path, overrides)
    raw.pop("__base_dir__", None)
    if raw.get("kind") != "serve":
        raise ServeSpecError(f"{path}: not a serve spec (expected 'kind: serve', got kind {raw.get('kind')!r})")
    return parse_serve_spec(raw, str(path))
