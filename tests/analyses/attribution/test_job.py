"""The attribution job kind: spec validation, chunked execution into a real store, SQL views, plot."""

import pytest

from interplab.analyses.attribution import attribute
from interplab.analyses.attribution.job import AttributionRunner
from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.registry import get_kind, parse_spec
from interplab.store import open_store
from tests.analyses.jobs_inline import run_job as run_inline

PROMPTS = [
    {"prompt": "When Mary and John went to the store, John gave a drink to", "target": " Mary"},
    {"prompt": "The city of Paris is in", "target": " France and"},
]


def spec(**fields):
    raw = {"kind": "attribution", "model": "tiny-llama", "prompts": PROMPTS}
    raw.update(fields)
    return parse_spec(raw)


def run_job(job, model, store):
    return run_inline(AttributionRunner(), "attribution", job, model, store)


def test_job_rows_equal_the_driver_and_are_queryable(tmp_path, tiny_models):
    model = tiny_models("llama")
    job = spec(perturbation="delete", unit="word")
    store = open_store(str(tmp_path / "store"))
    run_id, summary = run_job(job, model, store)
    rows = store.sql(
        'SELECT prompt_id, method, position, token, unit, attribution, "window" FROM attributions WHERE run_id = $r '
        "ORDER BY prompt_id, method, position",
        {"r": run_id},
    ).to_pylist()
    costs = store.sql(
        "SELECT prompt_id, method, n_tokens, n_units, forwards, passes, rounds, base_logprob FROM attribution_summary "
        "WHERE run_id = $r ORDER BY prompt_id, method",
        {"r": run_id},
    ).to_pylist()
    assert [(c["prompt_id"], c["method"]) for c in costs] == [(0, "hipe"), (0, "itp"), (1, "hipe"), (1, "itp")]
    for i, p in enumerate(PROMPTS):
        for method in ("hipe", "itp"):
            direct = attribute(model, p["prompt"], p["target"], method=method, perturbation="delete", unit="word")
            got = [r for r in rows if r["prompt_id"] == i and r["method"] == method]
            assert len(got) == direct.task.n_tokens
            for r in got:
                u = r["unit"]
                assert r["attribution"] == pytest.approx(direct.scores.attribution[u], abs=1e-5)
                assert r["window"] == direct.scores.window[u]
            cost = next(c for c in costs if c["prompt_id"] == i and c["method"] == method)
            assert (cost["forwards"], cost["rounds"], cost["n_units"]) == (
                direct.cost.forwards,
                direct.cost.rounds,
                direct.task.n_units,
            )
            assert cost["base_logprob"] == pytest.approx(direct.base_logprob, abs=1e-5)
    itp = next(c for c in costs if c["method"] == "itp" and c["prompt_id"] == 0)
    assert itp["forwards"] == itp["n_units"] + 1 and itp["rounds"] == 1
    tokens = store.sql("SELECT tokens FROM prompts WHERE run_id = $r ORDER BY prompt_id", {"r": run_id}).to_pylist()
    assert [len(t["tokens"]) for t in tokens] == [c["n_tokens"] for c in costs if c["method"] == "itp"]
    assert any("attribution" in line for line in summary.lines)


def test_plot_shades_every_panel(tmp_path, tiny_models):
    model = tiny_models("llama")
    store = open_store(str(tmp_path / "store"))
    run_id, _ = run_job(spec(perturbation="zero", prompts=PROMPTS[:1]), model, store)
    plot = get_kind("attribution").plot
    out = plot(store, run_id, tmp_path / "shades.svg", None)[0]
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "hipe" in text and "itp" in text and "store" in text
    only = plot(store, run_id, tmp_path / "itp.svg", "itp")[0].read_text()
    assert "itp" in only and ": hipe" not in only
    with pytest.raises(ValueError, match="no attributions by method 'atp'"):
        plot(store, run_id, tmp_path / "x.png", "atp")


def test_dataset_prompts_and_batch_rows(tmp_path, tiny_models):
    model = tiny_models("gpt2")
    job = spec(model="tiny-gpt2", prompts=None, dataset={"name": "ioi", "n": 2}, method="itp", batch_rows=4)
    store = open_store(str(tmp_path / "store"))
    run_id, _ = run_job(job, model, store)
    costs = store.sql("SELECT n_units, forwards, passes FROM attribution_summary WHERE run_id = $r", {"r": run_id}).to_pylist()
    assert len(costs) == 2
    for c in costs:
        assert c["forwards"] == c["n_units"] + 1 and c["passes"] == -(-c["forwards"] // 4)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "shap"}, "method"),
        ({"perturbation": "blur"}, "perturbation"),
        ({"unit": "sentence"}, "unit"),
        ({"prompts": []}, "'prompts' is empty"),
        ({"prompts": None}, "exactly one of 'prompts'"),
        ({"dataset": {"name": "ioi"}}, "exactly one of 'prompts'"),
        ({"prompts": [{"prompt": "a", "target": ""}]}, "target"),
        ({"prompts": [{"prompt": "a", "target": " b", "answer": " c"}]}, "answer"),
        ({"baseline_token": " the"}, "only used by perturbation 'baseline'"),
        ({"hipe": {"overlap": 1.0}}, "overlap"),
        ({"hipe": {"threshold": "high"}}, "threshold"),
        ({"batch_rows": 0}, "batch_rows"),
    ],
)
def test_bad_specs_name_the_field(fields, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        spec(**fields)


def test_validate_names_the_field_that_does_not_fit_the_tokenizer(tiny_models):
    model = tiny_models("llama")
    runner = AttributionRunner()
    with pytest.raises(SpecError, match="baseline_token") as err:
        runner.validate(spec(perturbation="baseline", baseline_token=" Mary and"), model)
    assert "single token" in str(err.value)
    runner.validate(spec(perturbation="baseline", baseline_token=" the", hipe={"threshold": 0.5}), model)
