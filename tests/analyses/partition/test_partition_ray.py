"""Region assignment as Ray tasks over windows of a stored run equals the in-process assignment."""

import numpy as np
import pytest

from interplab.analyses.partition import assign, load_dictionary, source
from interplab.analyses.partition.job import capture_run_id
from tests.analyses.partition.conftest import SITE

pytestmark = pytest.mark.slow  # multi-process: the shared local Ray cluster


def test_ray_tasks_assign_like_this_process(partitioned, ray_cluster):
    store, _, run_id, _ = partitioned
    dictionary = load_dictionary(store, run_id)
    selection = source.run_selection(store, capture_run_id(run_id), SITE)
    windows = source.plan_windows(store, selection, 40)
    assert len(windows) > 3
    assert assign._ray_has_cpu(1.0)  # otherwise the tasks would run here and the test would prove nothing
    on_ray = list(assign.assign_windows(store.uri, selection, windows, dictionary, 4, tasks=3))
    local = list(assign.assign_windows(store.uri, selection, windows, dictionary, 4, tasks=1))
    assert [r.index for r in on_ray] == list(range(len(windows)))
    for a, b in zip(on_ray, local, strict=True):
        assert a.regions.equals(b.regions) and a.top.equals(b.top)
        np.testing.assert_array_equal(a.counts, b.counts)
    stored = store.sql("SELECT region FROM regions WHERE run_id = $r ORDER BY prompt_id, position", {"r": run_id})
    assert np.concatenate([r.regions.column("region").to_numpy() for r in on_ray]).tolist() == stored.column("region").to_pylist()
