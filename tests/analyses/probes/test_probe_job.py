"""The probe job kind on tiny-llama: in-process capture, a committed capture run as input, the
store views, reading probes back (tables, safetensors, the directions resolver), plot and errors."""

import json

import pytest
import torch

from interplab.analyses.directions import direction_intervention, resolve_direction
from interplab.analyses.probes import load_probe, save_safetensors, split_rows
from interplab.analyses.probes.features import check_input_run
from interplab.analyses.probes.job import ProbeRunner, spec_prompts
from interplab.jobs.capture import CaptureRunner
from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.registry import parse_spec
from interplab.store import open_store
from tests.analyses.jobs_inline import run_job

NAMES = ["Alice", "John", "Mary"]  # one token each for the tiny models' tokenizer


def spec(**fields):
    raw = {
        "kind": "probe",
        "model": "tiny-llama",
        "dataset": {"name": "ioi", "n": 48, "label": "order"},
        "sites": ["resid_post", "embed"],
    }
    raw.update(fields)
    return parse_spec(raw)


@pytest.fixture
def names(tmp_path):
    """Prompts whose label is their last word: at ``embed`` (position -1) the classes are three token embeddings."""
    path = tmp_path / "names.jsonl"
    subjects = ["I saw", "There is", "My friend met", "Look at", "We called", "She drew", "He found", "They liked"]
    with path.open("w") as f:
        for subject in subjects:
            for name in NAMES:
                f.write(json.dumps({"prompt": f"{subject} {name}", "name": name, "n": len(subject)}) + "\n")
    return str(path)


def probe_predictions(model, prompts, store, run_id, site):
    """Classes predicted by the stored probe on activations captured here, with the engine directly."""
    probe = load_probe(store, run_id, site)
    x = model.run(prompts.texts, capture=[site], positions=[-1], logits="none").cache[site][:, 0].float()
    return (x @ probe.weight.T + probe.bias.float()).argmax(-1), probe


def test_in_process_probes_match_their_stored_weights(tmp_path, tiny_models):
    model = tiny_models("llama")
    job = spec()
    store = open_store(str(tmp_path / "store"))
    run_id, summary = run_job(ProbeRunner(), "probe", job, model, store)
    rows = store.sql("SELECT * FROM probes WHERE run_id = $r ORDER BY site, layer", {"r": run_id}).to_pylist()
    assert [(r["site"], r["layer"]) for r in rows] == [("embed", None)] + [("resid_post", i) for i in range(model.n_layers)]
    prompts = spec_prompts(job, model)
    y = torch.tensor(prompts.class_ids())
    train, test = split_rows(y, job.test_fraction, job.seed)
    for r in rows:
        assert (r["n_train"], r["n_test"], r["n_classes"], r["d"]) == (len(train), len(test), 2, model.d_model)
        site = r["site"] if r["layer"] is None else f"{r['site']}.{r['layer']}"
        predicted, probe = probe_predictions(model, prompts, store, run_id, site)
        assert r["train_accuracy"] == pytest.approx(float((predicted[train] == y[train]).double().mean()))
        assert r["test_accuracy"] == pytest.approx(float((predicted[test] == y[test]).double().mean()))
        # an L2-regularised softmax probe's rows sum to zero: with two classes w0 = -w1
        assert torch.allclose(probe.weight[0], -probe.weight[1], atol=1e-5 * float(probe.weight.abs().max()))
    assert rows[0]["train_accuracy"] == 0.5  # embed at the last token (' to' in every prompt) says nothing
    weights = store.sql("SELECT count(*) AS n FROM probe_weights WHERE run_id = $r", {"r": run_id}).to_pylist()
    assert weights[0]["n"] == 2 * len(rows)
    for query in summary.for_run(run_id).sql:
        assert store.sql(query).num_rows > 0


def test_capture_run_then_probe_run(tmp_path, tiny_models, names):
    model = tiny_models("llama")
    store = open_store(str(tmp_path / "store"))
    capture = parse_spec(
        {
            "kind": "capture",
            "model": "tiny-llama",
            "dataset": {"path": names},
            "sites": ["embed"] + [f"resid_post.{i}" for i in range(model.n_layers)],
            "store_dtype": "float32",
            "batch_size": 5,
        }
    )
    capture_id, _ = run_job(CaptureRunner(), "capture", capture, model, store)
    dataset = {"path": names, "label": "name"}
    stored = spec(dataset=dataset, activations_run=capture_id, test_fraction=0.25)
    assert ProbeRunner().provenance(stored)["inputs"] == [capture_id]
    stored_id, _ = run_job(ProbeRunner(), "probe", stored, model, store)
    direct_id, _ = run_job(ProbeRunner(), "probe", spec(dataset=dataset, test_fraction=0.25), model, store)

    query = "SELECT site, layer, train_accuracy, test_accuracy, majority FROM probes WHERE run_id = $r ORDER BY site, layer"
    from_store = store.sql(query, {"r": stored_id}).to_pylist()
    in_process = store.sql(query, {"r": direct_id}).to_pylist()
    assert from_store == in_process  # the same activations, whether stored by a capture run or captured here
    assert from_store[0]["site"] == "embed" and from_store[0]["test_accuracy"] == 1.0  # the label is the last token
    assert from_store[0]["majority"] == pytest.approx(1 / 3)
    for site in ["embed"] + [f"resid_post.{i}" for i in range(model.n_layers)]:
        a, b = load_probe(store, stored_id, site), load_probe(store, direct_id, site)
        assert a.classes == b.classes == NAMES
        assert torch.allclose(a.weight, b.weight, atol=1e-4 * float(a.weight.abs().max()))

    # every probe as one safetensors file, and a probe direction through the directions resolver
    from safetensors.torch import load_file

    tensors = load_file(str(save_safetensors(store, stored_id, tmp_path / "probes.safetensors")))
    probe = load_probe(store, stored_id, "resid_post.1")
    assert torch.equal(tensors["resid_post.1.weight"], probe.weight)
    direction = resolve_direction(store, {"run_id": stored_id, "probe": "resid_post.1", "label": "John"})
    expected = probe.direction("John") / probe.direction("John").norm()
    assert torch.allclose(direction.tensor(), expected, atol=1e-6) and direction.site == "resid_post.1"
    steer = direction_intervention(
        store, {"direction": {"run_id": stored_id, "probe": "resid_post.1", "label": "John"}, "op": "steer", "coeff": 3.0}
    )
    base = model.run(["I saw Mary"], capture=["resid_post.1"]).cache["resid_post.1"]
    steered = model.run(["I saw Mary"], capture=["resid_post.1"], interventions=[steer]).cache["resid_post.1"]
    assert torch.allclose(steered - base, 3.0 * expected.expand_as(base), atol=1e-5)


def test_plot_writes_the_accuracy_curve(tmp_path, tiny_models):
    from interplab.analyses.probes.kind import plot_run

    model = tiny_models("llama")
    store = open_store(str(tmp_path / "store"))
    run_id, _ = run_job(ProbeRunner(), "probe", spec(sites=["resid_post"]), model, store)
    (svg,) = plot_run(store, run_id, tmp_path / "probes.svg")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "resid_post test" in text and "majority class" in text


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sites": ["z"]}, "whole-stream sites"),
        ({"sites": ["resid_post", "resid_post"]}, "must not repeat"),
        ({"dataset": {"path": "x.jsonl"}}, "'label' is required"),
        ({"dataset": {"name": "ioi", "label": "city"}}, "not a label of task 'ioi'"),
        ({"dataset": {"name": "ioi", "builtin": "ioi"}}, "exactly one of"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"l2": 0}, "l2"),
    ],
)
def test_bad_specs_name_the_field(fields, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        spec(**fields)


@pytest.mark.parametrize(
    "fields, path, message",
    [
        ({"sites": ["resid_post.99"]}, "sites[0]", "layer"),
        ({"position": 40}, "position", "out of range"),
        ({"dataset": {"name": "ioi", "n": 1}}, "dataset.label", "same label"),
    ],
)
def test_semantic_errors_name_the_field(fields, path, message, tiny_models):
    with pytest.raises(SpecError, match=message) as info:
        ProbeRunner().validate(spec(**fields), tiny_models("llama"))
    assert info.value.path == path


def test_input_run_is_checked(tmp_path, tiny_models, names):
    model = tiny_models("llama")
    store = open_store(str(tmp_path / "store"))
    capture = parse_spec({"kind": "capture", "model": "tiny-llama", "dataset": {"path": names, "limit": 6}, "sites": ["embed"]})
    capture_id, _ = run_job(CaptureRunner(), "capture", capture, model, store)
    texts = spec_prompts(spec(dataset={"path": names, "label": "name"}), model).texts
    with pytest.raises(SpecError, match="unknown run id") as info:
        check_input_run(store, "capture-nope", model, "tiny-llama", texts)
    assert info.value.path == "activations_run"
    with pytest.raises(SpecError, match="captured other prompts"):
        check_input_run(store, capture_id, model, "tiny-llama", texts)  # 24 prompts; the run holds 6
    with pytest.raises(SpecError, match="differ from dataset prompt 0"):
        check_input_run(store, capture_id, model, "tiny-llama", texts[1:7])
    with pytest.raises(SpecError, match="captured model 'tiny-llama' but this spec's model is 'tiny-gpt2'"):
        check_input_run(store, capture_id, model, "tiny-gpt2", texts[:6])
    check_input_run(store, capture_id, model, "tiny-llama", texts[:6])


def test_a_missing_label_column_names_the_field(tiny_models, names):
    job = spec(dataset={"path": names, "label": "colour"})
    with pytest.raises(SpecError, match="record 0 of the dataset has no field 'colour'") as info:
        ProbeRunner().validate(job, tiny_models("llama"))
    assert info.value.path == "dataset.label" and "animal" not in info.value.allowed and "name" in info.value.allowed
