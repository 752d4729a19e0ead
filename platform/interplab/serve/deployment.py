"""The Ray Serve deployment of one model, and deploying, listing and stopping served models.

    url = deploy("tiny-llama", tokens="tokens.txt")                 # on the current Ray cluster
    url = deploy("smollm2-135m", parallel={"stages": 2}, replicas=2, name="smol")

Each served model is one Serve application named after the model (or ``name``), with one
deployment, :class:`ModelDeployment`, behind Serve's HTTP proxy at ``/NAME``. Each replica loads the
model once through :func:`interplab.runtime.build_backend` (``parallel.stages > 1``: a pipeline of
stage actors placed as the runtime places them) and answers ``POST /NAME/OP`` (``docs/serving.md``):
bearer token first (:mod:`~interplab.serve.auth`), then the frame (:mod:`~interplab.serve.wire`),
the checks (:mod:`~interplab.serve.service`), the queue (:mod:`~interplab.serve.batching`) and the
model's own thread. Every failure is answered with its status and a JSON error; the replica keeps
serving.
"""

# no "from __future__ import annotations": FastAPI reads the route handlers' annotations at run time
import re
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application, Deployment

from interplab.serve.auth import TokenAuth
from interplab.serve.limits import BatchingConfig, ServeLimits
from interplab.serve.server import Server
from interplab.serve.spec import ServeSpec

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_PORT = 8000

app = FastAPI(title="interplab model service")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1000)
@serve.ingress(app)
class ModelDeployment:
    """One replica: loads the model once and answers ``POST /NAME/OP`` through a :class:`Server`."""

    def __init__(
        self,
        model: str,
        name: str,
        tokens: str,
        parallel: dict[str, Any] | None = None,
        dtype: str = "float32",
        seed: int = 0,
        limits: dict[str, Any] | None = None,
        batching: dict[str, Any] | None = None,
    ) -> None:
        import ray

        from interplab.runtime import build_backend

        # a replica given GPUs (resources.num_gpus) computes on them; a pipeline's stages place their own
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        auth = TokenAuth(tokens)
        self.server = Server(
            lambda: build_backend(model, parallel, dtype=dtype, seed=seed, device=device),  # loaded in the model's thread
            name=name,
            auth=auth,
            limits=ServeLimits.model_validate(limits or {}),
            batching=BatchingConfig.model_validate(batching or {}),
            dtype=dtype,
            source=model,
            parallel=parallel,
        )
        from ray import serve as ray_serve

        from interplab.serve.export import CounterExport

        self.replica = ray_serve.get_replica_context().replica_id.unique_id
        self.export = CounterExport(name)

    @app.post("/{op}")
    async def handle(self, op: str, request: Request) -> Response:
        declared = request.headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        limit = self.server.limits.max_request_bytes
        body = b"" if length is not None and length > limit else await request.body()  # too big: not read at all
        answer = await self.server.answer(op, request.headers.get("authorization"), body, length)
        self.export.update(self.server.counters(), self.replica)  # before answering: counted once answered
        return Response(content=answer.body, status_code=answer.status, media_type=answer.content_type)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def stats(self) -> dict[str, Any]:
        """Counters for ``interplab serve status`` (called through a deployment handle, not HTTP)."""
        return self.server.stats()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


# --------------------------------------------------------------------------- deploying and managing
def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"serve name {name!r}: use letters, digits, '.', '_' and '-' (it becomes the URL path /NAME); "
            "pass --name for a model given as a path"
        )
    return name


def default_name(model: str) -> str:
    base = model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return base if NAME_PATTERN.match(base) else re.sub(r"[^A-Za-z0-9._-]", "-", base)[:63].strip("-.") or "model"


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for one model: the builder ``serveConfigV2`` names
    (``import_path: interplab.serve.deployment:build_app``, ``args`` as :meth:`ServeSpec.app_args`)."""
    known = {"model", "name", "tokens", "parallel", "dtype", "seed", "limits", "batching"}
    extra = sorted(set(args) - known)
    if extra:
        raise ValueError(f"build_app: unknown argument {extra[0]!r}; allowed: {', '.join(sorted(known))}")
    if "model" not in args or "tokens" not in args:
        raise ValueError("build_app: 'model' and 'tokens' are required")
    return _bind(args)


def _bind(args: dict[str, Any], **options: Any) -> Application:
    name = check_name(args.get("name") or default_name(args["model"]))
    ServeLimits.model_validate(args.get("limits") or {})
    BatchingConfig.model_validate(args.get("batching") or {})
    deployment = cast(Deployment, ModelDeployment)  # what @serve.deployment made of the class
    return deployment.options(name=name, **options).bind(
        args["model"],
        name,
        args["tokens"],
        args.get("parallel"),
        args.get("dtype", "float32"),
        args.get("seed", 0),
        args.get("limits"),
        args.get("batching"),
    )


def deploy(spec: ServeSpec) -> str:
    """Deploy ``spec``'s model as the Serve application ``spec.name`` on the connected Ray cluster; its URL.

    Serve's HTTP proxy starts on ``spec.http`` if Serve is not running on the cluster yet (a running
    Serve keeps its own address). Returns once every replica has loaded the model."""
    from interplab.serve.auth import read_tokens

    args = spec.app_args()
    name = check_name(spec.name or default_name(spec.model))
    read_tokens(args["tokens"])  # a bad tokens path fails here, not in every replica
    serve.start(http_options={"host": spec.http.host, "port": spec.http.port})
    # a runtime_env of its own: replicas start in fresh worker processes, never in a pooled worker
    # that earlier ran other tasks of this Ray job (their imports and state would be the replica's)
    options: dict[str, Any] = {"num_cpus": spec.resources.num_cpus, "runtime_env": {"env_vars": {"INTERPLAB_SERVE_APP": name}}}
    if spec.resources.num_gpus:
        options["num_gpus"] = spec.resources.num_gpus
    application = _bind({**args, "name": name}, num_replicas=spec.replicas, ray_actor_options=options)
    serve.run(application, name=name, route_prefix=f"/{name}", blocking=False)
    return f"{proxy_url()}/{name}"


def proxy_url() -> str:
    """The base URL of Serve's HTTP proxy on this cluster."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()  # Ray has no public call for the proxy's address
    if client is None:
        raise RuntimeError("Serve is not running on this Ray cluster")
    config = client.http_config
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def served() -> dict[str, dict[str, Any]]:
    """Every Serve application on the cluster whose deployment is a :class:`ModelDeployment`, by name:
    status, message and replica states."""
    out: dict[str, dict[str, Any]] = {}
    for app_name, status in serve.status().applications.items():
        deployments = status.deployments
        if app_name not in deployments:
            continue
        dep = deployments[app_name]
        out[app_name] = {
            "status": str(status.status.value),
            "message": status.message or dep.message,
            "replicas": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()},
        }
    return out


REPLICA_PREFIX = "SERVE_REPLICA::"  # Ray Serve names each replica actor SERVE_REPLICA::APP#DEPLOYMENT#ID


def replica_actors(name: str) -> list[str]:
    """The actor names of application ``name``'s live replicas (namespace ``serve``), e.g. to
    ``ray.kill`` one: Serve has no public call for them, so they are read from Ray's named actors."""
    import ray

    prefix = f"{REPLICA_PREFIX}{check_name(name)}#{name}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def stats(name: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """A running application's counters (:meth:`ModelDeployment.stats`), from one of its replicas
    (``serve_metrics`` has them summed over every replica, from Ray's metrics)."""
    handle = serve.get_app_handle(check_name(name))
    counters: dict[str, Any] = handle.stats.remote().result(timeout_s=timeout_s)
    return counters


def stop(name: str) -> None:
    """Delete the application ``name`` (its replicas and their stage actors go with it)."""
    if name not in serve.status().applications:
        raise LookupError(f"no served model named {name!r}; served: {', '.join(served()) or 'none'}")
    serve.delete(name)
