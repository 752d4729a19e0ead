"""Reuse of results by jobs: content keys, whole-run reuse before Ray, capture-level reuse.

The capture-level tests drive the capture runner in this process on a real tiny model whose
``run`` counts the prompts it is given (every forward pass goes through it), and compare the reused
run with a fresh capture of the same prompts. The end-to-end tests run ``interplab run`` on the
shared test Ray cluster."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from interplab.jobs.prepare import prepare
from interplab.jobs.reuse import SOURCES_FIELD, before_run, content_key
from interplab.store import open_store, reuse

from .conftest import interplab, job_env, rows, run_id_of

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The city of Paris is in France",
    "Mary lives in",
]
NEW = ["John went to the park", "Alice gave a ball to the city"]
SITES = ["resid_post.1", "z.0"]


def _raw(prompts, **extra):
    return {"kind": "capture", "model": "tiny-llama", "prompts": list(prompts), "sites": SITES, "batch_size": 2, **extra}


@pytest.fixture(scope="module")
def counting_model():
    """tiny-llama whose ``run`` records how many prompts each forward pass is given."""
    from interplab import load_model

    model = load_model("tiny-llama")
    model.forwarded = []
    original = model.run

    def run(prompts, *args, **kwargs):
        model.forwarded.extend([prompts] if isinstance(prompts, str) else list(prompts))
        return original(prompts, *args, **kwargs)

    model.run = run
    return model


def run_here(raw, store_uri, model, *, recompute=False):
    """What ``run_job`` does around the capture runner, in this process (no Ray): the reuse step,
    begin, every chunk, commit. Returns (run id, the prompts forwarded)."""
    job, uri = prepare(raw, store=store_uri)
    assert before_run(job, uri, recompute=recompute, echo=lambda line: None).found is None
    model.forwarded.clear()
    writer = open_store(uri).begin_run(
        "capture",
        model=model.name,
        spec=job.record,
        weight_hash=model.weight_hash,
        provenance=dict(job.provenance),
        inputs=job.provenance.get(SOURCES_FIELD),
    )
    for chunk in job.chunk_ids:
        job.kind.runner.run_chunk(job.spec, model, chunk, writer)
    writer.commit()
    return writer.run_id, list(model.forwarded)


def _acts(store, run_id):
    """(prompt_id, position, site, layer, head) -> act of a run, through the SQL view."""
    out = {}
    for r in store.sql(
        "SELECT prompt_id, position, site, layer, head, act FROM activations WHERE run_id = $r", {"r": run_id}
    ).to_pylist():
        out[(r["prompt_id"], r["position"], r["site"], r["layer"], r["head"])] = np.array(r["act"], np.float32)
    return out


def _same_rows(a, b):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=2e-3, err_msg=str(key))  # float16 storage


def test_superset_capture_runs_forwards_only_for_new_prompts(tmp_path, counting_model):
    store_uri = str(tmp_path / "store")
    first, forwarded = run_here(_raw(PROMPTS), store_uri, counting_model)
    assert forwarded == PROMPTS
    superset = [PROMPTS[0], NEW[0], PROMPTS[1], PROMPTS[2], NEW[1]]  # new prompts between old ones
    second, forwarded = run_here(_raw(superset), store_uri, counting_model)
    assert forwarded == NEW  # 2 of 5 prompts run forward
    fresh, forwarded = run_here(_raw(superset), str(tmp_path / "fresh"), counting_model)
    assert forwarded == superset

    store, reference = open_store(store_uri), open_store(str(tmp_path / "fresh"))
    info = store.run(second)
    assert info.inputs == (first,) and info.provenance[SOURCES_FIELD] == [first]
    assert {e.source_run for e in info.files if e.table == "activations"} == {first, None}
    _same_rows(_acts(store, second), _acts(reference, fresh))
    # the prompts view shows the run whole, with its own prompt ids and token ids
    q = "SELECT prompt_id, token_ids, tokens FROM prompts WHERE run_id = $r ORDER BY prompt_id"
    assert store.sql(q, {"r": second}).to_pylist() == reference.sql(q, {"r": fresh}).to_pylist()
    # export reads the referenced rows under the new prompt ids too
    for site in ("resid_post.1", "z.0"):
        got, index = store.export(second, site, with_index=True)
        want, want_index = reference.export(fresh, site, with_index=True)
        np.testing.assert_array_equal(index["prompt_id"], want_index["prompt_id"])
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_fewer_positions_and_a_subset_need_no_forward_but_a_missing_site_does(tmp_path, counting_model):
    store_uri = str(tmp_path / "store")
    run_here(_raw(PROMPTS), store_uri, counting_model)
    subset = [PROMPTS[2], PROMPTS[0]]
    picked, forwarded = run_here(_raw(subset, positions=[-1, 0]), store_uri, counting_model)
    assert forwarded == []
    fresh, _ = run_here(_raw(subset, positions=[-1, 0]), str(tmp_path / "fresh"), counting_model)
    _same_rows(_acts(open_store(store_uri), picked), _acts(open_store(str(tmp_path / "fresh")), fresh))
    # a site no run holds: the prompts run again (a prompt is reused only with every site)
    _, forwarded = run_here(_raw(subset, sites=["resid_post.1", "resid_post.0"]), store_uri, counting_model)
    assert forwarded == subset
    # another storage dtype is never reused
    _, forwarded = run_here(_raw(subset, store_dtype="float32"), store_uri, counting_model)
    assert forwarded == subset


def test_a_job_whose_every_row_is_reused_starts_no_ray_and_loads_no_model(tmp_path, counting_model, no_ray, monkeypatch):
    """``run_job`` itself: the subset's chunks only write references, in this process."""
    import interplab.jobs.model as job_model
    from interplab.jobs.execute import run_job

    store_uri = str(tmp_path / "store")
    first, _ = run_here(_raw(PROMPTS), store_uri, counting_model)
    monkeypatch.setattr(job_model, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    job, uri = prepare(_raw([PROMPTS[1], PROMPTS[0]], positions=[-1]), store=store_uri)
    lines = []
    result = run_job(job, uri, progress=False, echo=lines.append)
    assert not result.reused and result.n_computed == 1 and "writing references only" in " ".join(lines)
    store = open_store(store_uri)
    info = store.run(result.run_id)
    assert info.inputs == (first,) and not [e for e in info.files if e.table == "activations" and e.source_run is None]
    fresh, _ = run_here(_raw([PROMPTS[1], PROMPTS[0]], positions=[-1]), str(tmp_path / "fresh"), counting_model)
    _same_rows(_acts(store, result.run_id), _acts(open_store(str(tmp_path / "fresh")), fresh))


def test_recompute_reuses_nothing(tmp_path, counting_model):
    store_uri = str(tmp_path / "store")
    first, _ = run_here(_raw(PROMPTS), store_uri, counting_model)
    job, uri = prepare(_raw(PROMPTS), store=store_uri)
    found = before_run(job, uri, echo=lambda line: None).found
    assert found is not None and found.run.run_id == first
    again, forwarded = run_here(_raw(PROMPTS), store_uri, counting_model, recompute=True)
    assert forwarded == PROMPTS and again != first
    assert SOURCES_FIELD not in open_store(store_uri).run(again).provenance


def test_the_cli_reports_a_committed_run_without_importing_torch(tmp_path, counting_model):
    """``interplab run`` of a job whose results exist: found by the key computed from the spec, the
    cached weights hash and the ``tokenizers`` library; neither torch nor transformers is imported."""
    store_uri = str(tmp_path / "store")
    first, _ = run_here(_raw(PROMPTS), store_uri, counting_model)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_raw(PROMPTS)))
    script = (
        "import sys\n"
        "from interplab.cli.main import main\n"
        f"sys.argv = ['interplab', 'run', {str(spec)!r}, '--store', {store_uri!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=job_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"reused run {first} in {store_uri}" in proc.stdout
    assert "imported: []" in proc.stdout


@pytest.mark.parametrize("model", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_the_fast_key_is_the_full_key(tmp_path, model):
    """The key ``interplab run`` computes before validation (``tokenizers``, no transformers) is the key
    the driver computes with the model's own tokenizer, so a lookup finds what a run recorded."""
    from interplab.jobs.reuse import fast_content_key

    raw = {**_raw(PROMPTS + ["  spaces, punctuation; and UPPER case!"]), "model": model, "positions": [-1]}
    job, _ = prepare(raw, store=str(tmp_path / "s"))
    assert fast_content_key(raw) == content_key(job)


def test_content_key_ignores_placement_and_changes_with_results(tmp_path):
    def key(raw):
        job, _ = prepare(raw, store=str(tmp_path / "s"))
        return content_key(job)

    base = key(_raw(PROMPTS))
    assert base == key(_raw(PROMPTS, batch_size=1, workers=2, description="again", retries=3))
    assert base != key(_raw(PROMPTS[:2]))
    assert base != key(_raw(PROMPTS, positions=[-1]))
    assert base != key(_raw(PROMPTS, dtype="bfloat16"))
    assert base != key({**_raw(PROMPTS), "model": "tiny-gpt2"})
    assert base != key(_raw(PROMPTS, seed=1))  # a tiny model's weights are its seed


def _save_tiny(folder):
    from interplab.models.tiny import build_tiny

    model, tokenizer = build_tiny("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_changed_weights_reuse_nothing(tmp_path, monkeypatch):
    from interplab import load_model
    from interplab.models.weights import spec_weight_hash
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    _save_tiny(folder)
    raw = {**_raw(PROMPTS), "model": str(folder)}
    model = load_model(str(folder))
    model.forwarded = []
    original = model.run
    model.run = lambda prompts, *a, **k: (model.forwarded.extend(prompts), original(prompts, *a, **k))[1]
    store_uri = str(tmp_path / "store")
    first, _ = run_here(raw, store_uri, model)
    assert model.weight_hash == spec_weight_hash(str(folder))  # the worker's hash is the driver's

    job, uri = prepare(raw, store=store_uri)
    assert before_run(job, uri, echo=lambda line: None).found.run.run_id == first

    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[7] += 1e-3  # one value, in the middle of the file
    save_file(tensors, path, metadata={"format": "pt"})
    job, uri = prepare(raw, store=store_uri)
    step = before_run(job, uri, echo=lambda line: None)
    assert step.found is None and step.plan is None
    assert SOURCES_FIELD not in job.provenance  # not even single rows
    assert job.provenance[reuse.CONTENT_KEY] != open_store(store_uri).run(first).provenance[reuse.CONTENT_KEY]


# -- end to end: interplab run on the shared test cluster ------------------------------------------


def _spec(tmp_path, name, prompts):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**_raw(prompts), "resources": {"num_cpus": 0.5}}))
    return path


@pytest.mark.slow
def test_interplab_run_reuses_runs_and_rows(tmp_path, ray_head, cli, no_ray, monkeypatch, record_property, counting_model):
    """The first run is made in this process (as ``run_job``'s workers make it); the rest is the CLI."""
    store = str(tmp_path / "store")
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
    spec = _spec(tmp_path, "first", PROMPTS)
    first, _ = run_here({**_raw(PROMPTS), "resources": {"num_cpus": 0.5}}, store, counting_model)

    # (a) the same job again: reported, exit 0, no Ray (no_ray), the model never built
    import interplab.jobs.model as job_model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(job_model, "build_model", refuse)
    started = time.perf_counter()
    result = cli("run", str(spec), "--store", store, "--no-progress")
    elapsed = time.perf_counter() - started
    record_property("second_identical_job_s", round(elapsed, 3))
    print(f"second identical job (in-process CLI: spec parse + content key + lookup): {elapsed:.2f} s")
    assert result.exit_code == 0, result.output
    assert run_id_of(result.output) == first and f"reused run {first} in {store}" in result.output

    # (d) --recompute goes on to start the job (the in-process tests show it computes every prompt)
    with pytest.raises(AssertionError, match="ray.init was called"):
        cli("run", str(spec), "--store", store, "--no-progress", "--recompute")

    # (b) a superset: only the new prompts are computed; the views show it whole
    proc = interplab("run", str(_spec(tmp_path, "superset", PROMPTS + NEW)), "--store", store, "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    superset = run_id_of(proc.stdout)
    assert "reusing the rows of 3 of 5 prompt(s)" in proc.stdout
    opened = open_store(store)
    info = opened.run(superset)
    own = [e for e in info.files if e.table == "activations" and e.source_run is None]
    assert sum(e.rows for e in own if e.site == "resid_post") == sum(len(t.split()) for t in NEW)  # tiny: a word a token
    counts = rows(
        store, f"SELECT site, count(DISTINCT prompt_id) AS p FROM activations WHERE run_id = '{superset}' GROUP BY site"
    )
    assert {r["site"]: r["p"] for r in counts} == {"resid_post": 5, "z": 5}

    # (e) the reused run is protected: listed in the new run's inputs, kept by retention
    from interplab.store.catalog import gc_plan

    source = info.inputs[0]
    assert source == first
    kept = {d.run.run_id: d.kept for d in gc_plan(opened.runs(), kinds=["capture"])}
    assert kept[source] and superset in kept[source]
