"""The partition job on tiny-llama: capture run -> partition run -> views, checked against plain loops."""

import numpy as np
import pytest

from interplab.analyses.partition import exemplar_direction, load_dictionary, ood_scores
from interplab.analyses.partition.job import PartitionRunner, capture_run_id
from interplab.jobs.errors import SpecError, SpecErrors
from tests.analyses.partition.conftest import SITE, partition_spec, run_partition
from tests.analyses.partition.reference import plain_assign, plain_leader


def q(store, sql, run_id):
    return store.sql(sql, {"r": run_id}).to_pylist()


def test_views_equal_the_plain_loop_over_the_captured_activations(partitioned):
    store, _, run_id, summary = partitioned
    capture = capture_run_id(run_id)
    assert store.run(capture).kind == "capture" and store.run(capture).status == "committed"
    acts, index = store.export(capture, SITE, with_index=True)  # the captured rows, by another read path
    meta = q(store, "SELECT * FROM dictionaries WHERE run_id = $r", run_id)[0]
    assert meta["threshold"] == 0.25 and meta["inputs"] == [capture] and meta["n_rows"] == len(acts)

    expected = plain_leader(acts, 0.25, "cosine")
    exemplars = q(store, "SELECT * FROM exemplars WHERE run_id = $r ORDER BY region", run_id)
    assert meta["n_regions"] == len(exemplars) == len(expected)
    assert [(e["prompt_id"], e["position"]) for e in exemplars] == [
        (int(index["prompt_id"][i]), int(index["position"][i])) for i in expected
    ]
    np.testing.assert_array_equal(np.array([e["vector"] for e in exemplars], dtype=np.float32), acts[expected])

    regions = q(store, "SELECT * FROM regions WHERE run_id = $r ORDER BY prompt_id, position", run_id)
    ref_region, ref_dist = plain_assign(acts, acts[expected], "cosine")
    assert [r["region"] for r in regions] == ref_region.tolist()
    np.testing.assert_allclose([r["distance"] for r in regions], ref_dist, atol=1e-5)
    assert [e["n_members"] for e in exemplars] == np.bincount(ref_region, minlength=len(expected)).tolist()
    assert {r["source_run"] for r in regions} == {capture}
    assert f"{len(expected)} regions from {len(acts)} rows" in summary.lines[0]
    for query in summary.sql:  # every printed query runs and returns rows
        assert store.sql(query.replace("{run_id}", run_id)).num_rows > 0


def test_region_members_are_the_nearest_rows_with_context(partitioned):
    store, _, run_id, _ = partitioned
    members = q(store, "SELECT * FROM region_members WHERE run_id = $r ORDER BY region, rank", run_id)
    regions = q(store, "SELECT region, distance, prompt_id, position FROM regions WHERE run_id = $r", run_id)
    exemplars = {e["region"]: e for e in q(store, "SELECT region, prompt_id, position, token FROM exemplars WHERE run_id = $r", run_id)}
    for region in {m["region"] for m in members}:
        mine = [m for m in members if m["region"] == region]
        nearest = sorted(r["distance"] for r in regions if r["region"] == region)[: len(mine)]
        np.testing.assert_allclose([m["distance"] for m in mine], nearest, atol=1e-6)
        assert len(mine) == min(8, sum(r["region"] == region for r in regions))
    first = [m for m in members if m["rank"] == 0]
    for m in first:  # rank 0 is at distance ~0: the exemplar itself, or a row equal to it
        assert m["distance"] < 1e-5 and m["token"] == exemplars[m["region"]]["token"]
    m = members[0]
    assert f"[{m['token']}]" in m["context"] and m["context"].replace("[", "").replace("]", "") in m["prompt"]


def test_stored_run_and_sql_inputs_give_the_same_dictionary(partitioned):
    store, model, run_id, _ = partitioned
    capture = capture_run_id(run_id)
    base = load_dictionary(store, run_id)
    job = partition_spec(capture_run=capture, threshold=0.25, window_rows=37, block_rows=11)
    by_run, _ = run_partition(job, model, store)
    sql = f"SELECT run_id, prompt_id, position, token, act FROM activations WHERE run_id = '{capture}' AND site = 'resid_post' AND layer = 1"
    by_sql, _ = run_partition(partition_spec(sql=sql, site=None, threshold=0.25, match_with=[run_id]), model, store)
    for other in (by_run, by_sql):
        np.testing.assert_array_equal(load_dictionary(store, other).vectors, base.vectors)
    assert PartitionRunner().provenance(job)["inputs"] == [capture]  # the job driver records it in run.json
    assert q(store, "SELECT inputs FROM dictionaries WHERE run_id = $r", by_run)[0]["inputs"] == [capture]
    match = q(store, "SELECT * FROM partition_match WHERE run_id = $r", by_sql)
    assert len(match) == 2 * base.size
    assert all(m["status"] == "preserved" and m["mutual"] and m["region"] == m["match_region"] for m in match)
    assert all(m["similarity"] == pytest.approx(1.0, abs=1e-6) for m in match)


def test_percentile_threshold_and_a_new_layer_matched(partitioned):
    store, model, run_id, _ = partitioned
    capture = capture_run_id(run_id)
    other, summary = run_partition(partition_spec(capture_run=capture, threshold="p10", sample=100, match_with=[run_id]), model, store)
    meta = q(store, "SELECT threshold, percentile, n_regions FROM dictionaries WHERE run_id = $r", other)[0]
    acts = store.export(capture, SITE)
    assert meta["percentile"] == 10.0 and 0 < meta["threshold"] < 1
    assert meta["n_regions"] == len(plain_leader(acts, meta["threshold"], "cosine"))
    statuses = {m["status"] for m in q(store, "SELECT status FROM partition_match WHERE run_id = $r", other)}
    assert statuses <= {"preserved", "new", "vanished"} and "preserved" in statuses
    assert any("preserved" in line for line in summary.lines)


def test_ood_score_of_prompts_equals_the_regions_view(partitioned):
    store, model, run_id, _ = partitioned
    dictionary = load_dictionary(store, run_id)
    texts = [r["prompt"] for r in q(store, "SELECT prompt FROM region_members WHERE run_id = $r AND prompt_id < 2 ORDER BY prompt_id LIMIT 1", run_id)]
    scores = ood_scores(model, texts, dictionary)
    pid = q(store, "SELECT prompt_id FROM region_members WHERE run_id = $r AND prompt = $p LIMIT 1".replace("$p", "'" + texts[0].replace("'", "''") + "'"), run_id)[0]["prompt_id"]
    stored = q(store, f"SELECT region, distance FROM regions WHERE run_id = $r AND prompt_id = {pid} ORDER BY position", run_id)
    assert scores.regions[0].tolist() == [s["region"] for s in stored]
    np.testing.assert_allclose(scores.distances[0], [s["distance"] for s in stored], atol=1e-5)
    assert scores.prompt_scores("max")[0] == pytest.approx(max(s["distance"] for s in stored), abs=1e-5)
    u = exemplar_direction(store, run_id, 0)
    np.testing.assert_allclose(u, dictionary.vectors[0] / np.linalg.norm(dictionary.vectors[0]), rtol=1e-6)


def test_plot(partitioned, tmp_path):
    from interplab.analyses.partition.kind import plot_run

    store, _, run_id, _ = partitioned
    out = plot_run(store, run_id, tmp_path / "partition.png")
    assert out[0].read_bytes()[:4] == b"\x89PNG"


def test_safetensors_round_trip(partitioned, tmp_path):
    from interplab.analyses.partition import Dictionary

    store, _, run_id, _ = partitioned
    d = load_dictionary(store, run_id)
    back = Dictionary.load_safetensors(d.save_safetensors(tmp_path / "d.safetensors"))
    np.testing.assert_array_equal(back.vectors, d.vectors)
    assert (back.metric, back.threshold, back.site, back.run_id) == (d.metric, d.threshold, SITE, run_id)


def test_validation_names_the_field(partitioned):
    from interplab.analyses.partition.job import PartitionRunner

    _, model, _, _ = partitioned
    with pytest.raises(SpecError, match="site"):
        PartitionRunner().validate(partition_spec(capture_run="r1", site="resid_post.40"), model)
    with pytest.raises(SpecError, match="positions"):
        PartitionRunner().validate(partition_spec(prompts=["Mary lives in"], positions=[-20]), model)


def test_a_capture_run_of_another_model_is_refused(partitioned):
    store, model, run_id, _ = partitioned
    job = partition_spec(capture_run=capture_run_id(run_id), model="tiny-gpt2", threshold=0.3)
    with pytest.raises(SpecError, match="model"):
        run_partition(job, model, store)
    with pytest.raises(SpecError, match="unknown run id"):
        run_partition(partition_spec(capture_run="capture-nope", threshold=0.3), model, store)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "exactly one input"),
        ({"capture_run": "r1", "sql": "SELECT 1"}, "exactly one input"),
        ({"capture_run": "r1", "site": None}, "'site' is required"),
        ({"sql": "SELECT 1"}, "'site' goes with"),
        ({"capture_run": "r1", "positions": [-1]}, "positions"),
        ({"capture_run": "r1", "threshold": "p200"}, "threshold"),
        ({"capture_run": "r1", "threshold": -1.0}, "threshold"),
        ({"capture_run": "r1", "metric": "manhattan"}, "metric"),
        ({"capture_run": "r1", "site": "resid_middle.2"}, "site"),
        ({"prompts": []}, "'prompts' is empty"),
        ({"prompts": ["a b"], "positions": [-1, -1]}, "distinct"),
    ],
)
def test_bad_specs_name_the_field(fields, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        partition_spec(**fields)
