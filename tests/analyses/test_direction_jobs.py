"""Stored directions in capture and patching specs (``interventions:``), checked against hand-written
projection hooks on the Hugging Face model; the direction runs and the probe/partition input runs
are recorded as the new run's ``inputs`` (the ``runs`` view, and retention keeps them); references
that do not resolve are spec errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from interplab.analyses.directions import resolve_direction
from interplab.analyses.partition.job import capture_run_id
from interplab.analyses.probes.job import ProbeRunner
from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.execute import open_run
from interplab.jobs.prepare import prepare
from interplab.jobs.registry import parse_spec
from interplab.store import open_store
from interplab.store.catalog import gc_plan

from tests.analyses.jobs_inline import run_job
from tests.analyses.partition.conftest import partition_spec, run_partition
from tests.conftest import SHORT

PAIR = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary",
    "wrong": " John",
}
DIRECTION_LAYER = 1  # both stored directions live at resid_post.1


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_models):
    """A store with a tiny-llama partition run (its own capture run first) and a probe run, both at resid_post.1."""
    model = tiny_models("llama")
    uri = str(tmp_path_factory.mktemp("directions") / "store")
    store = open_store(uri)
    partition_id, _ = run_partition(partition_spec(dataset={"builtin": "ioi", "limit": 16}, threshold=0.25), model, store)
    probe = parse_spec(
        {
            "kind": "probe",
            "model": "tiny-llama",
            "dataset": {"builtin": "ioi", "limit": 48, "label": "answer"},
            "sites": ["resid_post.1"],
        }
    )
    probe_id, _ = run_job(ProbeRunner(), "probe", probe, model, store)
    label = store.sql("SELECT class FROM probe_weights WHERE run_id = $r ORDER BY class LIMIT 1", {"r": probe_id}).to_pylist()[0][
        "class"
    ]
    return {"uri": uri, "store": store, "partition": partition_id, "probe": probe_id, "label": label}


@pytest.fixture(scope="module")
def hf_llama():
    """The same tiny llama run by transformers (float64, like the engine model these tests use)."""
    from interplab.models.tiny import build_tiny

    model, _ = build_tiny("llama")
    model.set_attn_implementation("eager")
    return model.double().eval()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def hf_forward(hf, input_ids, u, *, record=(), pre_edits=None):
    """HF forward with ``x - (x . u) u`` on decoder layer DIRECTION_LAYER's output (resid_post.1):
    the logits, the outputs of the layers in ``record`` (resid_post), and each layer's input
    (resid_pre); ``pre_edits[layer](hidden)`` edits a layer's input first."""
    outputs, inputs, handles = {}, {}, []
    pre_edits = pre_edits or {}

    def ablate(module, args, output):
        hidden = _hidden(output)
        return _replace(output, hidden - (hidden @ u)[..., None] * u)

    def keep(layer):
        def hook(module, args, output):
            outputs[layer] = _hidden(output).detach().clone()

        return hook

    def pre(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer in pre_edits:
                hidden = pre_edits[layer](hidden)
            inputs[layer] = hidden.detach().clone()
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    layers = hf.model.layers
    handles.append(layers[DIRECTION_LAYER].register_forward_hook(ablate))
    for layer in record:
        handles.append(layers[layer].register_forward_hook(keep(layer)))
    for layer in range(len(layers)):
        handles.append(layers[layer].register_forward_pre_hook(pre(layer), with_kwargs=True))
    try:
        with torch.no_grad():
            logits = hf(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs, inputs


def run_through_driver(raw, uri, model):
    """What ``run_job`` does around a runner, in this process: prepare (spec checks, directions
    resolved), the driver's ``open_run`` (begin_run with the job's inputs), every chunk, finalize, commit."""
    job, uri = prepare(raw, store=uri)
    store = open_store(uri)
    writer = open_run(store, job, {"name": model.name, "weight_hash": model.weight_hash}, None, False)
    for chunk in job.chunk_ids:
        job.kind.runner.run_chunk(job.spec, model, chunk, writer)
    job.kind.runner.finalize(job.spec, model, writer)
    writer.commit()
    return job, writer.run_id


def test_capture_with_an_ablated_exemplar_equals_a_manual_projection_hook(stored, tiny_models, hf_llama):
    model = tiny_models("llama", "float64")
    ref = {"run_id": stored["partition"], "region": 3}
    raw = {
        "kind": "capture",
        "model": "tiny-llama",
        "prompts": SHORT,  # no row equals an exemplar (an ablated exemplar's own row is ~0, where RMSNorm amplifies rounding)
        "sites": ["resid_post.1", "resid_post.2"],
        "store_dtype": "float32",
        "batch_size": 2,
        "interventions": [{"direction": ref, "op": "ablate"}],
    }
    job, run_id = run_through_driver(raw, stored["uri"], model)
    assert job.inputs == [stored["partition"]]
    store = open_store(stored["uri"])
    u = torch.from_numpy(resolve_direction(store, ref).vector).double()
    rows = store.sql(
        "SELECT prompt_id, position, layer, act FROM activations WHERE run_id = $r ORDER BY prompt_id, layer, position",
        {"r": run_id},
    ).to_pylist()
    for prompt_id, prompt in enumerate(SHORT):
        ids = model.tokenize([prompt]).input_ids
        _, outputs, _ = hf_forward(hf_llama, ids, u, record=(1, 2))
        for layer in (1, 2):
            got = torch.tensor(
                np.array([r["act"] for r in rows if r["prompt_id"] == prompt_id and r["layer"] == layer]), dtype=torch.float64
            )
            reference = outputs[layer][0]
            if layer == DIRECTION_LAYER:  # the hook's output is the ablated value
                reference = reference - (reference @ u)[..., None] * u
                assert got.matmul(u).abs().max() < 1e-5  # nothing left along u
            torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)  # stored as float32
    plain = model.run(SHORT[:1], capture=["resid_post.2"], logits="none").cache["resid_post.2"][0].double()
    first = torch.tensor(np.array([r["act"] for r in rows if r["prompt_id"] == 0 and r["layer"] == 2]), dtype=torch.float64)
    assert (first - plain).abs().max() > 1e-3  # the ablation changed what was captured


def test_patching_with_a_background_probe_ablation_equals_a_manual_patch_loop(stored, tiny_models, hf_llama):
    """Every (layer, position) resid_pre patch of the job equals transformers with the projection hook in
    the clean, corrupted and patched runs and one clean resid_pre value written into the corrupted run."""
    model = tiny_models("llama", "float64")
    ref = {"run_id": stored["probe"], "probe": "resid_post.1", "label": stored["label"]}
    raw = {
        "kind": "patching",
        "model": "tiny-llama",
        "prompts": [PAIR],
        "sweep": "resid_pre",
        "interventions": [{"direction": ref, "op": "ablate"}],
    }
    job, run_id = run_through_driver(raw, stored["uri"], model)
    assert job.inputs == [stored["probe"]]
    store = open_store(stored["uri"])
    u = torch.from_numpy(resolve_direction(store, ref).vector).double()
    tok = model.tokenizer
    answer, wrong = (tok(PAIR[k], add_special_tokens=False)["input_ids"][0] for k in ("answer", "wrong"))
    clean_ids = model.tokenize([PAIR["clean"]]).input_ids
    corrupted_ids = model.tokenize([PAIR["corrupted"]]).input_ids

    def logit_diff(logits):
        return float(logits[0, -1, answer] - logits[0, -1, wrong])

    clean_logits, _, clean_pre = hf_forward(hf_llama, clean_ids, u)
    corrupted_logits, _, _ = hf_forward(hf_llama, corrupted_ids, u)
    base = {
        r["name"]: r["value"]
        for r in store.sql("SELECT name, value FROM baselines WHERE run_id = $r AND sweep = ''", {"r": run_id}).to_pylist()
    }
    assert base["clean"] == pytest.approx(logit_diff(clean_logits), abs=1e-6)
    assert base["corrupted"] == pytest.approx(logit_diff(corrupted_logits), abs=1e-6)
    plain = model.run([PAIR["clean"]], logits="last").logits
    assert abs(base["clean"] - float(plain[0, answer] - plain[0, wrong])) > 1e-4  # the ablation matters

    rows = store.sql("SELECT layer, position, value FROM patching WHERE run_id = $r", {"r": run_id}).to_pylist()
    assert len(rows) == model.n_layers * clean_ids.shape[1]
    for row in rows:
        layer, position = row["layer"], row["position"]

        def write_clean(hidden, layer=layer, position=position):
            hidden = hidden.clone()
            hidden[:, position] = clean_pre[layer][:, position]
            return hidden

        patched, _, _ = hf_forward(hf_llama, corrupted_ids, u, pre_edits={layer: write_clean})
        assert row["value"] == pytest.approx(logit_diff(patched), abs=1e-6), (layer, position)


def test_direction_and_capture_runs_are_inputs_that_retention_keeps(stored, tiny_models):
    """A probe job's activations_run and a capture job's direction runs land in the ``runs`` view's
    ``inputs``; a retention sweep over every capture/partition/probe run keeps them."""
    model = tiny_models("llama")
    uri = stored["uri"]
    capture_raw = {
        "kind": "capture",
        "model": "tiny-llama",
        "dataset": {"builtin": "ioi", "limit": 24},
        "sites": ["resid_post.1"],
        "positions": [-1],
        "store_dtype": "float32",
        "batch_size": 24,
    }
    _, capture_id = run_through_driver(capture_raw, uri, model)
    probe_raw = {
        "kind": "probe",
        "model": "tiny-llama",
        "dataset": {"builtin": "ioi", "limit": 24, "label": "answer"},
        "sites": ["resid_post.1"],
        "activations_run": capture_id,
    }
    _, probe_id = run_through_driver(probe_raw, uri, model)
    steer = {"direction": {"run_id": stored["partition"], "region": 0}, "op": "steer", "coeff": 2.0}
    _, steered_id = run_through_driver(
        {**capture_raw, "dataset": {"builtin": "ioi", "limit": 2}, "interventions": [steer]}, uri, model
    )
    partition_raw = {
        "kind": "partition",
        "model": "tiny-llama",
        "capture_run": capture_id,
        "site": "resid_post.1",
        "threshold": 0.3,
    }
    partition_job, _ = prepare(partition_raw, store=uri)
    assert partition_job.inputs == [capture_id]

    store = open_store(uri)
    inputs = {
        r["run_id"]: list(r["inputs"])
        for r in store.sql(
            "SELECT run_id, inputs FROM runs WHERE run_id IN ($a, $b)", {"a": probe_id, "b": steered_id}
        ).to_pylist()
    }
    assert inputs == {probe_id: [capture_id], steered_id: [stored["partition"]]}
    decisions = {d.run.run_id: d.kept for d in gc_plan(store.runs(), kinds=["capture", "partition"], older_than_days=0)}
    assert decisions[capture_id] == f"an input of {probe_id}"
    assert (decisions[stored["partition"]] or "").startswith("an input of ")  # of the steered capture, or an earlier test's run
    assert decisions[capture_run_id(stored["partition"])] == f"part of {stored['partition']}"  # its own capture


def _spec_error(raw, uri) -> SpecError:
    with pytest.raises((SpecError, SpecErrors)) as info:
        prepare(raw, store=uri)
    exc = info.value
    return exc.errors[0] if isinstance(exc, SpecErrors) else exc


@pytest.mark.parametrize(
    ("direction", "extra", "path", "message"),
    [
        ({"run_id": "probe-nope", "probe": "resid_post.1"}, {}, "interventions[0].direction.run_id", "probe-nope"),
        ({"run_id": "{partition}", "region": 10_000}, {}, "interventions[0].direction.region", "out of range"),
        (
            {"run_id": "{partition}", "probe": "resid_post.1"},
            {},
            "interventions[0].direction.run_id",
            "'probe' refers to a probe run",
        ),
        ({"run_id": "{probe}", "region": 0}, {}, "interventions[0].direction.run_id", "'region' refers to a partition run"),
        (
            {"run_id": "{probe}", "probe": "resid_post.2", "label": "{label}"},
            {},
            "interventions[0].direction.probe",
            "no probe at 'resid_post.2'",
        ),
        (
            {"run_id": "{probe}", "probe": "resid_post.1", "label": "Nobody"},
            {},
            "interventions[0].direction.label",
            "no class 'Nobody'",
        ),
        ({"run_id": "{probe}", "probe": "resid_post.1"}, {}, "interventions[0].direction.label", "pick one with 'label'"),
        ({"run_id": "{partition}", "region": 0}, {"site": "z.0"}, "interventions[0].site", "has 64 dimensions; z.0 has 16"),
        ({"run_id": "{partition}", "region": 0}, {"site": "resid_post.9"}, "interventions[0].site", "9"),
        ({"run_id": "{partition}", "region": 0}, {"positions": [-1, 40]}, "interventions[0].positions[1]", "which has"),
        ({"run_id": "{partition}", "region": 0}, {"positions": [-41]}, "interventions[0].positions[0]", "out of range"),
    ],
)
def test_references_that_do_not_resolve_name_the_field(stored, direction, extra, path, message):
    names = {"partition": stored["partition"], "probe": stored["probe"], "label": stored["label"]}
    direction = {k: v.format(**names) if isinstance(v, str) else v for k, v in direction.items()}
    raw = {
        "kind": "capture",
        "model": "tiny-llama",
        "prompts": SHORT,
        "sites": ["resid_post.2"],
        "interventions": [{"direction": direction, **extra}],
    }
    error = _spec_error(raw, stored["uri"])
    assert error.path == path and message in str(error), str(error)
    patching = {
        "kind": "patching",
        "model": "tiny-llama",
        "prompts": [PAIR],
        "interventions": [{"direction": direction, **extra}],
    }
    assert _spec_error(patching, stored["uri"]).path == path


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ({"direction": {"run_id": "r", "region": 0}, "op": "erase"}, "interventions[0].op"),
        ({"direction": {"run_id": "r"}}, "interventions[0].direction"),
        ({"direction": {"run_id": "r", "probe": "nowhere.3"}}, "interventions[0].direction"),
        ({"direction": {"run_id": "r", "region": -1}}, "interventions[0].direction.region"),
        ({"direction": {"run_id": "r", "region": 0}, "coeff": "big"}, "interventions[0].coeff"),
    ],
)
def test_bad_entries_are_pydantic_errors_at_their_path(entry, path):
    for raw in (
        {"kind": "capture", "model": "tiny-llama", "prompts": SHORT, "sites": ["resid_post.2"], "interventions": [entry]},
        {"kind": "patching", "model": "tiny-llama", "prompts": [PAIR], "interventions": [entry]},
    ):
        with pytest.raises((SpecError, SpecErrors)) as info:
            parse_spec(raw)
        errors = info.value.errors if isinstance(info.value, SpecErrors) else [info.value]
        assert [e.path for e in errors] == [path], str(info.value)


def test_a_missing_store_is_an_error_at_the_run_id(tmp_path):
    raw = {
        "kind": "capture",
        "model": "tiny-llama",
        "prompts": SHORT,
        "sites": ["resid_post.2"],
        "interventions": [{"direction": {"run_id": "partition-x", "region": 0}}],
    }
    error = _spec_error(raw, str(tmp_path / "empty"))
    assert error.path == "interventions[0].direction.run_id" and error.value == "partition-x"


def test_records_of_specs_without_interventions_are_unchanged():
    """Content keys and resume checks compare spec records: an empty ``interventions`` is not recorded."""
    capture = parse_spec({"kind": "capture", "model": "tiny-llama", "prompts": SHORT, "sites": ["resid_post.2"]})
    patching = parse_spec({"kind": "patching", "model": "tiny-llama", "prompts": [PAIR]})
    assert "interventions" not in capture.to_record() and "interventions" not in patching.to_record()
    entry = {"direction": {"run_id": "r", "region": 0}}
    with_entry = parse_spec(
        {"kind": "capture", "model": "tiny-llama", "prompts": SHORT, "sites": ["resid_post.2"], "interventions": [entry]}
    )
    assert with_entry.to_record()["interventions"][0]["direction"]["region"] == 0
    assert parse_spec(with_entry.to_record()) == with_entry  # a saved spec round-trips


def test_captures_share_no_rows_across_interventions(stored, tiny_models):
    """Row reuse: an intervened capture borrows no rows of a plain one with the same prompts and
    sites, and a later plain capture borrows rows of the plain run but none of the intervened run's."""
    from interplab.jobs.reuse import SOURCES_FIELD, before_run

    model = tiny_models("llama")
    uri = stored["uri"]
    plain = {"kind": "capture", "model": "tiny-llama", "prompts": SHORT, "sites": ["resid_post.2"], "store_dtype": "float32"}
    _, plain_id = run_through_driver(plain, uri, model)
    steer = {"direction": {"run_id": stored["partition"], "region": 0}, "op": "steer", "coeff": 2.0}
    intervened = {**plain, "interventions": [steer]}

    def reuse_step(raw):
        job, _ = prepare(raw, store=uri)
        return job, before_run(job, uri, echo=lambda line: None)

    job, step = reuse_step(intervened)
    assert step.found is None and (step.plan is None or not step.plan.sources) and SOURCES_FIELD not in job.provenance
    _, intervened_id = run_through_driver(intervened, uri, model)

    more = {**plain, "prompts": [*SHORT, "Paris is a city"]}  # not the same content key as the plain run
    job, step = reuse_step(more)
    assert step.plan is not None and plain_id in step.plan.sources and intervened_id not in step.plan.sources
