"""The ``grafting`` job kind: every sub-experiment into a real store, SQL over its tables, spec errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from interplab.analyses.grafting.job import GraftingRunner
from interplab.jobs.errors import SpecError
from interplab.jobs.registry import parse_spec
from interplab.store import open_store

HERE = Path(__file__).parent
FACTS = str(HERE / "tiny_facts.yaml")


def spec(**fields):
    raw = {"kind": "grafting", "model": "tiny-llama", "data": {"path": FACTS},
           "finetune": {"lr": "1e-2", "epochs": 2, "batch_size": 3}}
    raw.update(fields)
    return parse_spec(raw)


def test_all_experiments_into_a_store(tmp_path, tiny_models):
    from interplab.analyses.grafting.plot import plot_grafting
    from interplab.analyses.grafting.weights import get_weights

    model = tiny_models("llama")
    theta = get_weights(model)
    job = spec(experiments=["grafting", "freezing", "ordering", "scores"], seeds=[0], split_layer=2)
    runner = GraftingRunner()
    runner.validate(job, model)
    store = open_store(str(tmp_path / "store"))
    with store.begin_run("grafting", model=job.model, spec=job.to_record()) as writer:
        chunks = runner.chunks(job, model)
        assert len(chunks) == 4
        for chunk in chunks:
            runner.run_chunk(job, model, chunk, writer)
        runner.run_chunk(job, model, chunks[0], writer)  # a retried chunk replaces its rows
        summary = runner.finalize(job, model, writer)
        run_id = writer.run_id
    after = get_weights(model)
    assert all((after[n] == theta[n]).all() for n in theta)  # every chunk starts from and returns to θ
    q = lambda sql: store.sql(sql.replace("{run_id}", run_id)).to_pylist()  # noqa: E731
    graft = q("SELECT variant, layers, eval_set, count(*) AS n FROM grafting WHERE run_id = '{run_id}' "
              "AND experiment = 'grafting' GROUP BY ALL")
    assert {(r["variant"], r["layers"]) for r in graft} >= {("graft", "all"), ("graft", "early"), ("control", "late"), ("base", "all")}
    assert {r["n"] for r in graft} == {1}  # no duplicates from the retried chunk
    epochs = q("SELECT variant, list(DISTINCT epoch ORDER BY epoch) AS e FROM grafting WHERE run_id = '{run_id}' "
               "AND experiment = 'ordering' AND eval_set = 'ImplF_new' GROUP BY ALL")
    assert {r["variant"]: r["e"] for r in epochs} == {o: [0, 1, 2] for o in ("joint", "facts_first", "implications_first")}
    deltas = q("SELECT delta, count(*) AS n, min(bytes) AS b FROM deltas WHERE run_id = '{run_id}' GROUP BY ALL")
    assert {r["delta"] for r in deltas} == {"W_F-theta", "W_F_ImplF-W_F", "W_F_prime-theta", "W_ImplF-theta"}
    scores = q("SELECT score, component, count(*) AS n FROM grafting_scores WHERE run_id = '{run_id}' GROUP BY ALL")
    assert {r["score"] for r in scores} == {"upstream", "downstream", "informative"}
    assert q("SELECT count(*) AS n FROM grafting_train WHERE run_id = '{run_id}'")[0]["n"] > 0
    for query in summary.for_run(run_id).sql:
        assert store.sql(query).num_rows > 0, query
    out = plot_grafting(store, run_id, tmp_path / "grafting.png")
    assert Path(out).stat().st_size > 10_000


def test_spec_errors_name_the_field(tiny_models):
    model = tiny_models("llama")
    runner = GraftingRunner()
    with pytest.raises(SpecError) as err:
        runner.validate(spec(split_layer=3), model)
    assert err.value.path == "split_layer"
    with pytest.raises(SpecError) as err:
        runner.validate(spec(data={"task": "first_hop", "n": 40}), model)
    assert err.value.path == "data"
    with pytest.raises(SpecError) as err:
        runner.validate(spec(experiments=["scores"], parallel={"stages": 2}), model)
    assert err.value.path == "experiments"
    with pytest.raises(SpecError) as err:
        spec(experiments=["grafting", "surgery"])
    assert err.value.path == "experiments[1]"
    with pytest.raises(SpecError) as err:
        spec(finetune={"lr": -1.0})
    assert err.value.path == "finetune.lr[0]"


def test_bad_spec_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: grafting\nmodel: tiny-llama\nfinetune: {lr: 1.0e-4, epochs: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "interplab.jobs", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "finetune.epochs" in proc.stdout + proc.stderr
