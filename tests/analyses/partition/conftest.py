"""A tiny-llama capture run and partition runs over it, built once for the partition tests."""

from __future__ import annotations

import pytest

from interplab.jobs.registry import parse_spec
from interplab.store import open_store
from tests.analyses.jobs_inline import run_job
from tests.runtime.conftest import ray_cluster  # noqa: F401 - the shared local Ray cluster, for the Ray tests

SITE = "resid_post.1"


def partition_spec(**fields):
    raw = {"kind": "partition", "model": "tiny-llama", "site": SITE, "window_rows": 120, "block_rows": 50}
    raw.update(fields)
    return parse_spec({k: v for k, v in raw.items() if v is not None})


def run_partition(job, model, store):
    from interplab.analyses.partition.job import PartitionRunner

    return run_job(PartitionRunner(), "partition", job, model, store)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, tiny_models):
    """``(store, model, run_id, summary)`` of a dataset-mode partition run (16 IOI prompts captured first)."""
    model = tiny_models("llama")
    store = open_store(str(tmp_path_factory.mktemp("partition") / "store"))
    job = partition_spec(dataset={"builtin": "ioi", "limit": 16}, threshold=0.25)
    run_id, summary = run_partition(job, model, store)
    return store, model, run_id, summary
