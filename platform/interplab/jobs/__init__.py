"""Jobs: YAML specs with a ``kind`` registry, run on embedded Ray or submitted to a cluster.

::

    from interplab.jobs import load_spec_file, prepare, run_job
    job, store = prepare(load_spec_file("jobs/capture-smollm2.yaml"), "jobs/capture-smollm2.yaml")
    result = run_job(job, store)          # result.run_id, result.summary

Analyses register their kind with :func:`register_kind` (see :mod:`interplab.jobs.registry` for
the runner protocol) in a module named by an ``interplab.kinds`` entry point (:mod:`interplab.jobs.kinds`).
``docs/jobs.md`` describes specs, resume, submission and plugin kinds.
"""

from interplab.jobs.errors import JobError, JobInterrupted, SpecError, SpecErrors, at_path
from interplab.jobs.execute import JobResult, run_job
from interplab.jobs.kinds import KindLoadError
from interplab.jobs.prepare import PreparedJob, prepare, prepare_resume
from interplab.jobs.registry import (
    JobKind,
    JobRunner,
    JobSummary,
    PlotFunction,
    get_kind,
    kind_names,
    parse_spec,
    register_kind,
)
from interplab.jobs.spec import DatasetSpec, JobSpec, Resources, StrictModel, load_spec_file

__all__ = [
    "DatasetSpec",
    "JobError",
    "JobInterrupted",
    "JobKind",
    "JobResult",
    "JobRunner",
    "JobSpec",
    "JobSummary",
    "KindLoadError",
    "PlotFunction",
    "PreparedJob",
    "Resources",
    "SpecError",
    "SpecErrors",
    "StrictModel",
    "at_path",
    "get_kind",
    "kind_names",
    "load_spec_file",
    "parse_spec",
    "prepare",
    "prepare_resume",
    "register_kind",
    "run_job",
]
