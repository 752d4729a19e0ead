"""Submitting jobs to a Ray cluster through its Jobs API (``JobSubmissionClient``).

The submission carries everything the job needs in its ``runtime_env``: a working directory with the
resolved spec (``spec.yaml``, plus the dataset file if the spec names one) and, unless
``include_package=False``, this interplab package as a ``py_module`` (so the cluster runs the same
code as the laptop; the image must still provide torch, transformers, ray ...). The entrypoint is
``python -m interplab.jobs run spec.yaml --run-id RUN_ID``: a fixed run id makes a re-submitted or
retried job (KubeRay ``backoffLimit``) resume the same run instead of starting another.

Since Ray 2.52 clusters may require a token (``RAY_AUTH_MODE=token``); the client sends
``Authorization: Bearer <token>`` from ``--token-file``, ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, in that order.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from interplab.jobs.errors import JobError, SpecError
from interplab.jobs.kinds import EXTRA_KINDS_ENV
from interplab.jobs.prepare import PreparedJob

SUBMISSION_PREFIX = "interplab-"
SPEC_FILE = "spec.yaml"
_FORWARDED_ENV = (EXTRA_KINDS_ENV, "HF_HUB_OFFLINE")


def new_run_id(kind: str) -> str:
    import secrets
    from datetime import datetime, timezone

    return f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def read_token(token_file: str | None = None) -> str | None:
    """The cluster's auth token (see the module docstring), or None when none is configured."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise SpecError("--token-file", "token file not found", token_file, "a file holding the Ray auth token")
        return path.read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    candidates = [os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().read_text().strip() or None
    return None


def client(address: str | None, token_file: str | None = None):
    """A ``JobSubmissionClient`` for ``address`` (``http://HEAD:8265``) that carries the token."""
    if not address:
        raise SpecError("--address", "no Ray dashboard address", address, "http://HEAD:8265 (or set $RAY_API_SERVER_ADDRESS)")
    if not address.startswith(("http://", "https://")):
        raise SpecError("--address", "the Jobs API address is the dashboard's HTTP URL", address, "http://HEAD:8265")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        what = "was refused" if token else "is required and none was found"
        raise JobError(
            f"the Ray cluster at {address} uses token authentication and the token {what} "
            f"({str(exc).splitlines()[0]}); pass --token-file or set RAY_AUTH_TOKEN"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {str(exc).splitlines()[0]}") from None


def package_dir() -> Path:
    import interplab

    return Path(interplab.__file__).resolve().parent


def build_submission(
    job: PreparedJob,
    workdir: Path,
    *,
    run_id: str,
    store: str | None,
    retries: int | None,
    include_package: bool,
) -> dict[str, Any]:
    """Write ``workdir`` (spec + data) and return the ``submit_job`` keyword arguments."""
    record = job.record
    dataset = record.get("dataset")
    if isinstance(dataset, dict) and dataset.get("path"):
        source = Path(dataset["path"])
        target = workdir / f"dataset{source.suffix}"
        shutil.copyfile(source, target)
        record["dataset"] = {**dataset, "path": target.name}
    if store is not None:
        record["store"] = store
    (workdir / SPEC_FILE).write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    args = ["python", "-m", "interplab.jobs", "run", SPEC_FILE, "--run-id", run_id, "--no-progress"]
    if retries is not None:
        args += ["--retries", str(retries)]
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    runtime_env: dict[str, Any] = {"working_dir": str(workdir), "excludes": ["__pycache__", "*.pyc"]}
    if include_package:
        runtime_env["py_modules"] = [str(package_dir())]
    if env:
        runtime_env["env_vars"] = env
    return {
        "entrypoint": shlex.join(args),
        "submission_id": SUBMISSION_PREFIX + run_id,
        "runtime_env": runtime_env,
        "metadata": {"interplab_run_id": run_id, "interplab_kind": job.kind.name, "interplab_model": job.spec.model},
    }


def submit(
    job: PreparedJob,
    address: str,
    *,
    run_id: str | None = None,
    store: str | None = None,
    retries: int | None = None,
    include_package: bool = True,
    token_file: str | None = None,
) -> tuple[str, str]:
    """Submit ``job``; returns ``(submission_id, run_id)``."""
    run_id = run_id or new_run_id(job.kind.name)
    jobs = client(address, token_file)
    with tempfile.TemporaryDirectory(prefix="interplab-submit-") as tmp:
        kwargs = build_submission(job, Path(tmp), run_id=run_id, store=store, retries=retries, include_package=include_package)
        earlier = [j for j in jobs.list_jobs() if (j.metadata or {}).get("interplab_run_id") == run_id]
        if earlier:  # a resubmission of the same run (it resumes): submission ids must be unique
            kwargs["submission_id"] += f"-{len(earlier) + 1}"
        try:
            submission_id = jobs.submit_job(**kwargs)
        except RuntimeError as exc:
            raise JobError(f"the Ray Jobs API refused the submission: {str(exc).strip()[:500]}") from None
    return submission_id, run_id


def resolve_job(jobs, value: str) -> str:
    """The submission id for ``value``: a submission id, or a run id (its latest submission)."""
    if value.startswith(("raysubmit_", SUBMISSION_PREFIX)):
        return value
    matches = [j for j in jobs.list_jobs() if (j.metadata or {}).get("interplab_run_id") == value]
    if not matches:
        return SUBMISSION_PREFIX + value
    return max(matches, key=lambda j: j.start_time or 0).submission_id
