"""Serve commands: ``interplab serve MODEL|SPEC.yaml``, ``serve list``, ``serve status``, ``serve stop NAME``.

``interplab serve MODEL`` deploys on the Ray cluster at ``--address`` (or ``$RAY_ADDRESS``) and
returns: the model stays served until ``interplab serve stop NAME``. Without an address it starts an
embedded local Ray, serves until Ctrl-C, and shuts it down. ``list``/``status``/``stop`` join the
cluster at ``--address`` (default: the one running on this machine). Usage errors exit 2, failures 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from interplab.serve.spec import ServeSpec

TOKENS_ENV = "INTERPLAB_SERVE_TOKENS"  # interplab.serve.auth.TOKENS_ENV (not imported: it imports torch)

_ADDRESS_HELP = "Ray cluster address (GCS, e.g. HEAD:6379, or ray://HEAD:10001); env RAY_ADDRESS."


def register(cli: click.Group) -> None:
    cli.add_command(serve)


class _ModelOrCommand(click.Group):
    """``serve list`` runs the subcommand; ``serve MODEL ...`` runs the hidden ``up`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["up", *args]
        return super().parse_args(ctx, args)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from interplab.jobs.errors import SpecError
        from interplab.serve.auth import TokenFileError
        from interplab.serve.spec import ServeSpecError

        try:
            return fn(*args, **kwargs)
        except (ServeSpecError, SpecError, TokenFileError, ValidationError, LookupError) as exc:
            _fail(str(exc))
        except ValueError as exc:
            _fail(str(exc))

    return wrapper


def _join_ray(address: str | None, *, embedded_ok: bool) -> tuple[str, bool]:
    """Join Ray: (where, whether this process started an embedded cluster that lives only while it runs)."""
    import ray

    if ray.is_initialized():
        return "the connected Ray cluster", False
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **options)
        return f"Ray cluster at {address}", False
    if embedded_ok:
        ray.init(address="local", include_dashboard=False, **options)
        return "embedded local Ray", True
    try:
        ray.init(address="auto", **options)
    except ConnectionError:
        _fail("no Ray cluster found on this machine: pass --address HEAD:6379 (or set RAY_ADDRESS)")
    return "the local Ray cluster", False


@click.group(cls=_ModelOrCommand, invoke_without_command=False, context_settings={"help_option_names": ["-h", "--help"]})
def serve() -> None:
    """Serve models on Ray Serve for many users: interplab serve MODEL|SPEC.yaml [options], list, status, stop NAME."""


@serve.command("up", hidden=True)
@click.argument("model")
@click.option("--name", default=None, help="Served name and URL path (default: from the model).")
@click.option("--stages", default=None, help="Pipeline stages per replica (an int, or 'auto').")
@click.option("--replicas", type=int, default=None, help="Serve replicas, each with its own copy of the weights.")
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--tokens", default=None, help=f"Tokens file or directory (env {TOKENS_ENV}); see docs/serving.md.")
@click.option("--host", default=None, help="HTTP host of Serve's proxy (default 127.0.0.1), if this starts Serve.")
@click.option("--port", type=int, default=None, help="HTTP port of Serve's proxy (default 8000), if this starts Serve.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--num-cpus", type=float, default=None, help="CPUs per replica (default 1).")
@click.option("--num-gpus", type=float, default=None, help="GPUs per replica (default 0).")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE", help="A request limit, e.g. --limit max_rows=1024.")
@click.option("--batch-window-ms", type=float, default=None, help="Cross-request batching window (default 5 ms).")
@click.option("--no-batching", is_flag=True, help="Run every request alone.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of a SPEC.yaml.")
@_errors
def up(
    model: str,
    name,
    stages,
    replicas,
    address,
    tokens,
    host,
    port,
    dtype,
    num_cpus,
    num_gpus,
    limits,
    batch_window_ms,
    no_batching,
    overrides,
) -> None:
    """Deploy MODEL (a model name or a kind: serve spec file)."""
    spec = build_spec(
        model,
        overrides,
        name=name,
        stages=stages,
        replicas=replicas,
        tokens=tokens,
        host=host,
        port=port,
        dtype=dtype,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        limits=limits,
        batch_window_ms=batch_window_ms,
        no_batching=no_batching,
    )
    where, embedded = _join_ray(address, embedded_ok=True)
    from interplab.serve.deployment import deploy

    click.echo(f"deploying {spec.model} on {where} ...")
    try:
        url = deploy(spec)
    except RuntimeError as exc:
        _fail(f"deploying {spec.model} failed: {exc}", 1)
    click.echo(f"serving {spec.model} at {url}")
    click.echo(f"connect: interplab.serve.connect({url.rsplit('/', 1)[0]!r}, token=...).model({url.rsplit('/', 1)[1]!r})")
    if not embedded:
        click.echo(f"stop it with: interplab serve stop {spec.name or url.rsplit('/', 1)[1]}")
        return
    click.echo("embedded Ray: serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopping")


def build_spec(
    model: str,
    overrides: tuple[str, ...] = (),
    *,
    name: str | None = None,
    stages: str | None = None,
    replicas: int | None = None,
    tokens: str | None = None,
    host: str | None = None,
    port: int | None = None,
    dtype: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    limits: tuple[str, ...] = (),
    batch_window_ms: float | None = None,
    no_batching: bool = False,
) -> ServeSpec:
    """The serve spec of ``interplab serve MODEL|SPEC.yaml [options]``: the spec file's fields (or just
    the model), with each given option on top. The tokens path must be set somewhere."""
    from interplab.serve.spec import load_serve_spec, parse_serve_spec

    if model.endswith((".yaml", ".yml")) and os.path.isfile(model):
        base = load_serve_spec(model, overrides).model_dump(exclude_unset=True)
    elif overrides:
        raise ValueError("--set overrides the fields of a SPEC.yaml; give options for a model name")
    else:
        base = {"model": model}
    flags: dict[str, Any] = {"name": name, "replicas": replicas, "tokens": tokens, "dtype": dtype}
    raw = {**base, **{k: v for k, v in flags.items() if v is not None}}
    if stages is not None:
        raw["parallel"] = {**(base.get("parallel") or {}), "stages": int(stages) if stages.isdigit() else stages}
    raw["resources"] = {
        **(base.get("resources") or {}),
        **({"num_cpus": num_cpus} if num_cpus is not None else {}),
        **({"num_gpus": num_gpus} if num_gpus is not None else {}),
    }
    raw["http"] = {**(base.get("http") or {}), **({"host": host} if host else {}), **({"port": port} if port else {})}
    raw["limits"] = {**(base.get("limits") or {}), **_pairs(limits, "--limit")}
    batching = dict(base.get("batching") or {})
    if batch_window_ms is not None:
        batching["window_ms"] = batch_window_ms
    if no_batching:
        batching["enabled"] = False
    raw["batching"] = batching
    spec = parse_serve_spec(raw, "serve options")
    spec.tokens_path()
    return spec


def _pairs(items: tuple[str, ...], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()  # the limits' own validation converts and checks it
    return out


@serve.command("list")
@click.option("--address", default=None, help=_ADDRESS_HELP)
@_errors
def list_cmd(address) -> None:
    """The served models: name, status, replicas."""
    _join_ray(address, embedded_ok=False)
    from interplab.serve.deployment import served

    apps = served()
    if not apps:
        click.echo("no models served")
    for name, info in apps.items():
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in info["replicas"].items()) or "no replicas"
        click.echo(f"{name}\t{info['status']}\t{replicas}")


@serve.command("status")
@click.argument("name", required=False)
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def status_cmd(name, address, as_json) -> None:
    """Each served model (or NAME): replicas, stages, queue depth, requests/s, batch sizes, per-user counts."""
    _join_ray(address, embedded_ok=False)
    from interplab.serve.deployment import served, stats
    from interplab.serve.status import serve_metrics

    apps = served()
    if name is not None and name not in apps:
        raise LookupError(f"no served model named {name!r}; served: {', '.join(apps) or 'none'}")
    report = {}
    for app_name, info in apps.items():
        if name is not None and app_name != name:
            continue
        entry = dict(info)
        try:
            entry["serve_metrics"] = serve_metrics(app_name)
        except Exception as exc:  # noqa: BLE001 - status still prints the rest
            entry["serve_metrics_error"] = f"{type(exc).__name__}: {exc}"
        if info["status"] == "RUNNING":
            try:
                entry["stats"] = stats(app_name)  # one replica's counters
            except Exception as exc:  # noqa: BLE001 - status still prints what Serve knows
                entry["stats_error"] = f"{type(exc).__name__}: {exc}"
        report[app_name] = entry
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for app_name, entry in report.items():
        click.echo(f"{app_name}: {entry['status']}  replicas {entry['replicas']}")
        s = entry.get("stats")
        if s:
            b = s["batching"]
            click.echo(f"  model {s['model']} weights {s['weight_hash']} stages {s['stage_ranges']} (pids {s.get('stage_pids')})")
            click.echo(
                f"  queue {s['queue_depth']}  requests/s {s['requests_per_s']}  requests {s['requests']}  errors {s['errors']}"
            )
            click.echo(
                f"  batches {b['batches']} (sizes {b['batch_sizes']})  per user {b['per_user']}  in flight {s['in_flight']}"
            )
        elif "stats_error" in entry:
            click.echo(f"  (no counters: {entry['stats_error']})")
        m = entry.get("serve_metrics")
        if m:
            click.echo(
                f"  ray serve: requests {m['requests']}  queued {m['queued']}  ongoing {m['ongoing']}  "
                f"replica starts {m['replica_starts']}"
            )
            click.echo(
                f"  all replicas: operations {m['operations']}  per user {m['per_user']}  "
                f"batch sizes {m['batch_sizes']}  queue {m['queue_depth']}"
            )
            for rid, r in m["replicas"].items():
                state = "healthy" if r["healthy"] else "unhealthy"
                click.echo(
                    f"    replica {rid}: {state}  requests {r['requests']}  processing {r['processing']}  "
                    f"mean latency {r['mean_latency_ms']} ms"
                )
        elif "serve_metrics_error" in entry:
            click.echo(f"  (no Ray Serve metrics: {entry['serve_metrics_error']})")


@serve.command("stop")
@click.argument("name")
@click.option("--address", default=None, help=_ADDRESS_HELP)
@_errors
def stop_cmd(name, address) -> None:
    """Stop serving NAME (its replicas and stage actors end)."""
    _join_ray(address, embedded_ok=False)
    from interplab.serve.deployment import stop

    stop(name)
    click.echo(f"stopped {name}")
