"""Job commands: ``validate``, ``run``, ``submit``, ``jobs status|logs|stop|list``, ``k8s render``.

Usage errors (a bad spec, an unknown run, a missing address) print ``error: ...`` lines and exit with
code 2 before anything is written; a job that fails while running exits 1 (its run is marked failed
and ``interplab run --resume RUN_ID`` continues it); Ctrl-C / SIGTERM exit 130.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

_ADDRESS_HELP = "Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS)."


def register(cli: click.Group) -> None:
    cli.add_command(validate)
    cli.add_command(run)
    cli.add_command(submit)
    cli.add_command(jobs)
    cli.add_command(k8s)


def _errors(fn):
    """Spec/usage errors → exit 2; job failures → exit 1; interrupts → 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from interplab.jobs.errors import JobError, JobInterrupted, SpecError, SpecErrors
        from interplab.store import StoreError

        try:
            return fn(*args, **kwargs)
        except SpecErrors as exc:
            for error in exc.errors:
                click.echo(f"error: {error.describe()}", err=True)
            sys.exit(2)
        except (SpecError, StoreError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except JobInterrupted as exc:
            click.echo(f"error: {exc}{_resume_hint(exc)}", err=True)
            sys.exit(130)
        except JobError as exc:
            click.echo(f"error: {exc}{_resume_hint(exc)}", err=True)
            if exc.remote_traceback and os.environ.get("INTERPLAB_DEBUG"):
                click.echo(exc.remote_traceback, err=True)
            sys.exit(1)

    return wrapper


def _resume_hint(exc) -> str:
    run_id, store = getattr(exc, "run_id", None), getattr(exc, "store", None)
    if not run_id:
        return ""
    return f"\nrun {run_id} is marked failed; continue it with: interplab run --resume {run_id} --store {store}"


def _set_option(fn):
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a spec field (YAML value; dotted keys for nested fields), e.g. --set model=tiny-llama.",
    )(fn)


def _address_option(fn):
    return click.option("--address", envvar="RAY_API_SERVER_ADDRESS", default=None, help=_ADDRESS_HELP)(fn)


def _token_option(fn):
    return click.option(
        "--token-file",
        default=None,
        metavar="FILE",
        help="Ray auth token file (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).",
    )(fn)


def _load(spec_path: str, overrides: tuple[str, ...]):
    from interplab.jobs.spec import load_spec_file

    return load_spec_file(spec_path, overrides)


# -- validate / run ----------------------------------------------------------------------------


@click.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@_set_option
@_errors
def validate(spec_path: str, overrides: tuple[str, ...]) -> None:
    """Check a job spec completely (fields, model, sites, prompts) without running it."""
    from interplab.jobs.errors import SpecError, SpecErrors
    from interplab.jobs.prepare import prepare

    try:
        job, uri = prepare(_load(spec_path, overrides), spec_path)
    except SpecError as exc:
        raise SpecErrors([exc]) from None
    click.echo(f"ok: {spec_path} is a valid {job.kind.name} job for {job.spec.model}: {len(job.chunk_ids)} chunk(s), store {uri}")


@click.command()
@click.argument("spec_path", metavar="[SPEC.yaml]", required=False)
@_set_option
@click.option(
    "--store",
    "store_uri",
    default=None,
    metavar="URI",
    help="Store (a directory or s3://bucket/prefix); default: the spec's store, $INTERPLAB_STORE, ./interplab-store.",
)
@click.option(
    "--resume",
    "resume_id",
    default=None,
    metavar="RUN_ID",
    help="Continue a killed or failed run (computes only its missing chunks).",
)
@click.option(
    "--rerun", "rerun_id", default=None, metavar="RUN_ID", help="Start a new run with the exact spec saved with RUN_ID."
)
@click.option(
    "--run-id",
    "run_id",
    default=None,
    metavar="RUN_ID",
    help="Name the run; if it already exists it is resumed (committed: nothing to do).",
)
@click.option(
    "--retries", type=click.IntRange(min=0), default=None, help="Retries of a failed attempt (default: the spec's 'retries')."
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option(
    "--recompute",
    is_flag=True,
    help="Compute even if a committed run with the same content key exists (and reuse no rows); --rerun implies it.",
)
@click.option(
    "--user", "owner", default=None, help="The run's owner (default: $INTERPLAB_USER, the serving token's user, the OS user)."
)
@click.option("--team", default=None, help="The run's team (default: $INTERPLAB_TEAM, the team area the store is).")
@_errors
def run(spec_path, overrides, store_uri, resume_id, rerun_id, run_id, retries, progress, recompute, owner, team) -> None:
    """Run a job spec on Ray (embedded local Ray, or the cluster at $RAY_ADDRESS) into the store.

    \b
    interplab run jobs/capture-smollm2.yaml
    interplab run jobs/capture-smollm2.yaml --set model=tiny-llama --store /tmp/store
    interplab run --resume capture-20250101T120000-1a2b3c4d
    interplab run --rerun capture-20250101T120000-1a2b3c4d
    """
    from interplab.jobs.errors import SpecError
    from interplab.jobs.execute import run_job
    from interplab.jobs.prepare import check_resumable, find_run, prepare, prepare_resume, saved_spec, saved_store
    from interplab.jobs.spec import apply_overrides

    given = [x for x in (spec_path, resume_id, rerun_id) if x is not None]
    if len(given) != 1:
        raise SpecError(
            "SPEC.yaml",
            "give a spec file, --resume RUN_ID or --rerun RUN_ID (exactly one)",
            given or None,
            "interplab run SPEC.yaml | interplab run --resume RUN_ID | interplab run --rerun RUN_ID",
        )
    if resume_id is not None:
        if overrides or run_id:
            raise SpecError(
                "--resume",
                "a resumed run keeps its own spec and id; --set/--run-id do not apply",
                list(overrides) or run_id,
                "--resume RUN_ID [--store URI]",
            )
        job, uri, info = prepare_resume(resume_id, store_uri)
        run_id, resume = resume_id, True
    else:
        if rerun_id is not None:
            raw, source = apply_overrides(saved_spec(rerun_id, store_uri), overrides), f"run {rerun_id}"
            store_uri = store_uri or saved_store(rerun_id, store_uri)
            recompute = True  # a rerun computes again: that is what it is for
        else:
            raw, source = _load(spec_path, overrides), spec_path
        if not recompute and not run_id:  # results already committed: report them before loading anything
            from interplab.jobs.reuse import quick_lookup

            found = quick_lookup(raw, store_uri)
            if found is not None:
                _print_reused(found)
                return
        job, uri = prepare(raw, source, store=store_uri)
        info = find_run(uri, run_id) if run_id else None
        if run_id:
            from interplab.store import layout

            try:
                layout.check_run_id(run_id)
            except ValueError as exc:
                raise SpecError("--run-id", str(exc), run_id, "letters, digits, '_', '-', '.'") from None
        if info is not None:
            check_resumable(job, info)
        resume = info is not None
    if info is not None and info.status == "committed":
        click.echo(f"run_id: {info.run_id}")
        click.echo(f"run {info.run_id} is already committed; nothing to do")
        return
    if resume:
        click.echo(f"resuming {info.status} run {run_id}")
    job.owner, job.team = owner, team  # recorded with a new run (interplab.store.provenance resolves the rest)
    result = run_job(
        job, uri, run_id=run_id, resume=resume, retries=retries, progress=progress, echo=click.echo, recompute=recompute
    )
    _print_result(result)


def _print_reused(found) -> None:
    """A committed run with the job's content key (``interplab.jobs.reuse``), reported instead of running."""
    from interplab.jobs.registry import JobSummary

    run = found.run
    summary = JobSummary(**(run.metadata.get("summary") or {})).for_run(run.run_id)
    click.echo(f"run_id: {run.run_id}")
    click.echo(f"reused {found.describe()}: same content key, nothing recomputed (--recompute to run it again)")
    for line in summary.lines:
        click.echo(f"  {line}")
    click.echo(f"store: {found.store}")
    for query in summary.sql:
        click.echo(f'  interplab sql --store {found.store} "{query}"')


def _print_result(result) -> None:
    if result.reused:
        click.echo(f"run_id: {result.run_id}")
        click.echo(f"reused {result.reused}: same content key, nothing recomputed (--recompute to run it again)")
        for line in result.summary.lines:
            click.echo(f"  {line}")
        click.echo(f"store: {result.store}")
        for query in result.summary.sql:
            click.echo(f'  interplab sql --store {result.store} "{query}"')
        return
    reused = result.n_chunks - result.n_computed
    click.echo(
        f"committed run {result.run_id}: {result.n_chunks} chunk(s) ({result.n_computed} computed, "
        f"{reused} already done) in {result.seconds:.1f} s" + (f", {result.attempts} attempts" if result.attempts > 1 else "")
    )
    for line in result.summary.lines:
        click.echo(f"  {line}")
    click.echo(f"store: {result.store}")
    if result.summary.sql:
        click.echo("look at the results:")
        for query in result.summary.sql:
            click.echo(f'  interplab sql --store {result.store} "{query}"')


# -- submit / jobs -----------------------------------------------------------------------------


@click.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@_set_option
@_address_option
@click.option(
    "--store",
    "store_uri",
    default=None,
    metavar="URI",
    help="Shared store the job writes to (default: the spec's store, else the cluster's $INTERPLAB_STORE).",
)
@click.option("--run-id", "run_id", default=None, metavar="RUN_ID", help="Run id (default: a new one); resubmitting it resumes.")
@click.option(
    "--retries", type=click.IntRange(min=0), default=None, help="In-job retries of a failed attempt (default: the spec's)."
)
@click.option(
    "--package/--no-package",
    "include_package",
    default=True,
    help="Ship this interplab package with the job (default) or use the one installed on the cluster.",
)
@click.option(
    "--local-check/--no-local-check",
    default=True,
    help="Validate against the model here first (needs the model locally); pydantic checks always run.",
)
@_token_option
@_errors
def submit(spec_path, overrides, address, store_uri, run_id, retries, include_package, local_check, token_file) -> None:
    """Submit a job spec to a Ray cluster through the Jobs API."""
    from interplab.jobs.errors import SpecError
    from interplab.jobs.model import check_parallel
    from interplab.jobs.prepare import PreparedJob, check_store, check_store_uri, prepare
    from interplab.jobs.registry import get_kind, parse_spec
    from interplab.jobs.submit import submit as submit_job

    raw = _load(spec_path, overrides)
    if local_check:
        job, _ = prepare(raw, spec_path, store=store_uri)
    else:  # what needs no model: the fields, the spec's own store URI, parallel as a config
        spec = parse_spec(raw, spec_path)
        try:
            if spec.store:
                check_store_uri(spec.store, "store")
            check_parallel(spec)
        except SpecError as exc:
            raise exc.with_source(spec_path) from None
        job = PreparedJob(spec, get_kind(spec.kind), [], {}, spec_path)
    store = store_uri or job.spec.store
    if store is not None:
        store = check_store(store, "--store" if store_uri else "store")
    submission_id, run_id = submit_job(
        job, address, run_id=run_id, store=store, retries=retries, include_package=include_package, token_file=token_file
    )
    click.echo(f"submitted {submission_id}")
    click.echo(f"run_id: {run_id}")
    click.echo(f"follow it: interplab jobs logs {submission_id} --follow --address {address}")


@click.group()
def jobs() -> None:
    """Jobs on a Ray cluster: list, status, logs, stop."""


@jobs.command("list")
@_address_option
@_token_option
@click.option("--all", "show_all", is_flag=True, help="Also list jobs not submitted by interplab.")
@_errors
def jobs_list(address, token_file, show_all) -> None:
    """List submitted jobs, newest first."""
    from interplab.jobs.submit import client

    rows = sorted(client(address, token_file).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    click.echo(f"{'submission_id':<48} {'status':<10} {'run_id':<42} kind")
    for job in rows:
        meta = job.metadata or {}
        if not show_all and "interplab_run_id" not in meta:
            continue
        click.echo(
            f"{job.submission_id or job.job_id or '-':<48} {str(job.status.value if hasattr(job.status, 'value') else job.status):<10} "
            f"{meta.get('interplab_run_id', '-'):<42} {meta.get('interplab_kind', '-')}"
        )


@jobs.command("status")
@click.argument("job")
@_address_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print the full job details as JSON.")
@_errors
def jobs_status(job, address, token_file, as_json) -> None:
    """Status of a job (submission id or run id)."""
    from interplab.jobs.submit import client, resolve_job

    jobs_client = client(address, token_file)
    info = _job_info(jobs_client, resolve_job(jobs_client, job))
    status = info.status.value if hasattr(info.status, "value") else str(info.status)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "submission_id": info.submission_id,
                    "status": status,
                    "message": info.message,
                    "metadata": info.metadata,
                    "start_time": info.start_time,
                    "end_time": info.end_time,
                }
            )
        )
        return
    click.echo(f"{info.submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
    if info.metadata and "interplab_run_id" in info.metadata:
        click.echo(f"run_id: {info.metadata['interplab_run_id']}")


def _job_info(jobs_client, submission_id: str):
    from interplab.jobs.errors import SpecError

    try:
        return jobs_client.get_job_info(submission_id)
    except RuntimeError as exc:
        raise SpecError(
            "JOB",
            "no such job on this cluster",
            submission_id,
            f"a submission id from 'interplab jobs list' ({str(exc).splitlines()[0][:160]})",
        ) from None


@jobs.command("logs")
@click.argument("job")
@_address_option
@_token_option
@click.option("--follow", "-f", is_flag=True, help="Stream the logs until the job ends.")
@_errors
def jobs_logs(job, address, token_file, follow) -> None:
    """Logs of a job (its driver: progress, run id, summary, errors)."""
    from interplab.jobs.submit import client, resolve_job

    jobs_client = client(address, token_file)
    submission_id = resolve_job(jobs_client, job)
    _job_info(jobs_client, submission_id)
    if not follow:
        click.echo(jobs_client.get_job_logs(submission_id), nl=False)
        return
    import asyncio

    async def tail() -> None:
        async for lines in jobs_client.tail_job_logs(submission_id):
            click.echo(lines, nl=False)

    asyncio.run(tail())


@jobs.command("stop")
@click.argument("job")
@_address_option
@_token_option
@_errors
def jobs_stop(job, address, token_file) -> None:
    """Stop a job (its run is marked failed; resume it with interplab run --resume RUN_ID)."""
    from interplab.jobs.submit import client, resolve_job

    jobs_client = client(address, token_file)
    submission_id = resolve_job(jobs_client, job)
    _job_info(jobs_client, submission_id)
    stopped = jobs_client.stop_job(submission_id)
    click.echo(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")


# -- k8s ---------------------------------------------------------------------------------------


@click.group()
def k8s() -> None:
    """Kubernetes (KubeRay) manifests for jobs."""


@k8s.command("render")
@click.argument("spec_path", metavar="SPEC.yaml")
@_set_option
@click.option("--image", default=None, help="Container image with interplab installed (see k8s/Dockerfile).")
@click.option("--namespace", default=None)
@click.option(
    "--store-backend",
    type=click.Choice(["pvc", "s3"]),
    default="pvc",
    show_default=True,
    help="pvc: mount the shared interplab-store PVC; s3: INTERPLAB_STORE + credentials from the interplab-s3 Secret.",
)
@click.option("--gpus", "gpus", type=click.IntRange(min=0), default=1, show_default=True, help="GPUs per worker pod.")
@click.option("--max-workers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--run-id", "run_id", default=None, help="Run id (default: a new one).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, help="Write here instead of stdout."
)
@_errors
def k8s_render(spec_path, overrides, image, namespace, store_backend, gpus, max_workers, run_id, output) -> None:
    """Write a KubeRay RayJob (and the ConfigMap holding the spec) for SPEC.yaml."""
    from interplab.jobs.k8s import DEFAULT_IMAGE, RenderOptions, dump_all, render_rayjob
    from interplab.jobs.registry import parse_spec
    from interplab.jobs.submit import new_run_id

    spec = parse_spec(_load(spec_path, overrides), spec_path)
    record = spec.to_record()
    if record.get("dataset", {}) and (record.get("dataset") or {}).get("path"):
        from interplab.jobs.errors import SpecError

        raise SpecError(
            "dataset.path",
            "a local dataset file cannot travel in a RayJob; put it in the store volume "
            "or the image and give that path, or use interplab submit",
            record["dataset"]["path"],
            "a built-in dataset, inline prompts, or a path inside the image / shared volume",
        )
    run_id = run_id or new_run_id(spec.kind)
    opts = RenderOptions(
        image=image or DEFAULT_IMAGE,
        namespace=namespace,
        store_backend=store_backend,
        gpus_per_worker=gpus,
        max_workers=max_workers,
    )
    header = f"# RayJob for {spec_path} (run {run_id}); rendered by 'interplab k8s render'. Apply: kubectl apply -f FILE\n"
    text = dump_all(render_rayjob(record, run_id=run_id, opts=opts), header)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        click.echo(f"wrote {output} (run_id: {run_id})")
    else:
        click.echo(text, nl=False)
