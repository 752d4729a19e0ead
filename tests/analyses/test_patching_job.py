"""The patching job kind: spec validation, chunked execution into a real store, SQL, plot."""

import pytest

from interplab.analyses.patching import Sweep, activation_patching
from interplab.analyses.patching.job import PatchingRunner, pair_set
from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.registry import parse_spec
from interplab.store import open_store
from tests.analyses.jobs_inline import run_job as run_inline

PAIR = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary",
    "wrong": " John",
}


def spec(**fields):
    raw = {"kind": "patching", "model": "tiny-llama", "prompts": [PAIR], "sweep": "resid_pre"}
    raw.update(fields)
    return parse_spec(raw)


def run_job(job, model, store):
    return run_inline(PatchingRunner(), "patching", job, model, store)


def test_job_rows_equal_the_driver_and_are_queryable(tmp_path, tiny_models):
    model = tiny_models("llama")
    job = spec(sweep=["resid_pre", {"site": "z", "by": ["layer", "head"]}], method="both")
    store = open_store(str(tmp_path / "store"))
    run_id, summary = run_job(job, model, store)
    direct = activation_patching(model, pair_set(job, model), [Sweep("resid_pre"), Sweep("z", ("layer", "head"))], method="both")
    rows = store.sql("SELECT sweep, method, layer, position, head, value, normalized FROM patching WHERE run_id = $r ORDER BY sweep, method, layer, position, head", {"r": run_id}).to_pylist()
    assert len(rows) == len(direct.rows)
    expected = {(r["sweep"], r["method"], r["layer"], r["position"], r["head"]): r["value"] for r in direct.rows}
    for r in rows:
        assert r["value"] == pytest.approx(expected[(r["sweep"], r["method"], r["layer"], r["position"], r["head"])], abs=1e-5)  # batch composition differs: float32 rounding only
    base = {r["name"]: r["value"] for r in store.sql("SELECT name, value FROM baselines WHERE run_id = $r AND sweep = ''", {"r": run_id}).to_pylist()}
    assert base["clean"] == pytest.approx(direct.baselines["clean"])
    corr = store.sql("SELECT sweep FROM baselines WHERE run_id = $r AND name = 'exact_atp_correlation' ORDER BY sweep", {"r": run_id}).to_pylist()
    assert [c["sweep"] for c in corr] == ["resid_pre", "z"]
    assert any("clean" in line for line in summary.lines)


def test_finalize_reuses_the_baselines_its_chunks_computed(tmp_path, tiny_models, monkeypatch):
    """In the process that ran a chunk, finalize writes that chunk's baselines without running the
    clean and corrupted prompts again; elsewhere (a fresh model object) it computes them."""
    model = tiny_models("llama")
    job = spec()
    store = open_store(str(tmp_path / "store"))
    runner = PatchingRunner()
    direct = activation_patching(model, pair_set(job, model), [Sweep("resid_pre")])
    calls: list[object] = []
    real_run = type(model).run

    def counted(self, *args, **kwargs):
        calls.append(args[0])
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "run", counted)
    with store.begin_run("patching", model=job.model, spec=job.model_dump()) as writer:
        runner.run_chunk(job, model, "resid_pre", writer)
        before = len(calls)
        runner.finalize(job, model, writer)
        assert len(calls) == before  # no forward pass: the chunk's baselines
        writer.commit()
    base = {r["name"]: r["value"] for r in store.sql("SELECT name, value FROM baselines WHERE run_id = $r AND sweep = ''", {"r": writer.run_id}).to_pylist()}
    assert base == pytest.approx(direct.baselines, abs=1e-6)
    from interplab import load_model

    other = load_model("tiny-llama")  # the same weights, another process's model: nothing to reuse
    calls.clear()
    with open_store(str(tmp_path / "other")).begin_run("patching", model=job.model, spec=job.model_dump()) as again:
        runner.finalize(job, other, again)
        again.commit()
    assert len(calls) == 2  # clean and corrupted


def test_dataset_spec_and_plot(tmp_path, tiny_models):
    from interplab.analyses.patching.plot import plot_patching

    model = tiny_models("gpt2")
    job = spec(prompts=None, dataset={"name": "ioi", "n": 4, "seed": 0, "corruption": "abc"}, model="tiny-gpt2")
    store = open_store(str(tmp_path / "store"))
    run_id, _ = run_job(job, model, store)
    rows = store.sql("SELECT * FROM patching WHERE run_id = $r", {"r": run_id}).to_pylist()
    tokens = store.sql("SELECT tokens FROM prompts WHERE run_id = $r AND prompt_id = 0", {"r": run_id}).to_pylist()[0]["tokens"]
    assert len(rows) == model.n_layers * len(tokens)
    out = plot_patching(rows, tokens, tmp_path / "heat.svg")
    assert out.read_text().lstrip().startswith("<?xml") and "resid_pre (exact)" in out.read_text()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sweep": "resid"}, "unknown sweep site 'resid'"),
        ({"sweep": {"site": "z", "by": ["position"]}}, "cannot be by"),
        ({"metric": "accuracy"}, "unknown metric 'accuracy'"),
        ({"direction": "sideways"}, "direction"),
        ({"prompts": []}, "'prompts' is empty"),
        ({"prompts": None}, "exactly one of 'prompts'"),
        ({"dataset": {"name": "ioi", "n": 4}}, "exactly one of 'prompts'"),
        ({"prompts": None, "dataset": {"name": "winogrande"}}, "name"),
        ({"prompts": None, "dataset": {"name": "ioi", "corruption": "xyz"}}, "corruption"),
        ({"prompts": [{**PAIR, "extra": 1}]}, "extra"),
        ({"batch_rows": -3}, "batch_rows"),
    ],
)
def test_bad_specs_name_the_field(fields, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        spec(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompts": [{**PAIR, "corrupted": "When Mary went to the store, Mary gave a drink to"}]}, "same number of tokens"),
        ({"prompts": [{**PAIR, "answer": " Mary Mary"}]}, "must be a single token"),
        ({"sweep": "resid_mid", "model": "tiny-gpt_neox"}, "no resid_mid"),
        ({"prompts": None, "dataset": {"name": "ioi", "n": 4, "template": "all"}}, "same number of tokens"),
    ],
)
def test_semantic_errors_name_the_field(fields, message, tiny_models):
    job = spec(**fields)
    with pytest.raises(SpecError, match=message):
        PatchingRunner().validate(job, tiny_models(job.model.removeprefix("tiny-")))
