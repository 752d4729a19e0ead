"""The backend contract: every :class:`~interplab.engine.backend.Backend` passes the same tests.

Each test runs against the single-process model (``local``) and a two-stage Ray pipeline
(``pipeline-2``); references are independent of interplab wherever one exists: the tiny model run
by transformers itself (eager attention, forward hooks for steering and gradients), its greedy
``generate``, ``torch.optim.Adam`` on its parameters, and DuckDB reading the store back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interplab import load_model
from interplab.engine import AdamConfig, Backend, InterventionError, SiteError, StageRequest, steer
from interplab.engine.interventions import Intervention
from interplab.models.tiny import build_tiny
from interplab.store import open_store
from tests.runtime.helpers import ANSWER, CLEAN, CORRUPT, WRONG, logit_diff, next_token_loss

MODEL = "tiny-llama"
TOL = dict(rtol=1e-5, atol=1e-5)
PROMPTS = [*CLEAN, "The city of Paris is in"]  # unequal lengths: padded rows


@pytest.fixture(params=["local", "pipeline-2"])
def backend(request) -> Backend:
    if request.param == "local":
        return load_model(MODEL)
    pipelines = request.getfixturevalue("pipelines")
    return pipelines.get(MODEL, stages=2, micro_batches=2)


@pytest.fixture(scope="module")
def hf():
    """The same tiny model and tokenizer, run by transformers (eager attention)."""
    model, tokenizer = build_tiny("llama")
    model.set_attn_implementation("eager")
    return model.eval(), tokenizer


def _hf_logits(hf, batch, hook=None, layer: int = 0):
    model, _ = hf
    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True) if hook else None
    try:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        if handle is not None:
            handle.remove()


def _with_stream(args, kwargs, fn):
    """A decoder layer's pre-hook result with its input stream (positional or keyword) replaced by ``fn(stream)``."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


def _real(batch) -> torch.Tensor:
    return batch.attention_mask.bool()


# ------------------------------------------------------------------ shape, tokens, sites
def test_shape_config_and_stages(backend, hf):
    config = hf[0].config
    assert (backend.n_layers, backend.n_heads, backend.d_model, backend.d_vocab) == (
        config.num_hidden_layers, config.num_attention_heads, config.hidden_size, config.vocab_size)
    ranges = backend.stage_ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == backend.n_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for index, (start, stop) in enumerate(ranges):
        assert {backend.stage_of(f"resid_pre.{layer}") for layer in range(start, stop)} == {index}
    assert backend.stage_of("embed") == 0 and backend.stage_of("logits") == len(ranges) - 1
    assert (backend.local_model is backend) == (len(ranges) == 1 and backend.local_model is not None)


def test_tokens_and_sites(backend, hf):
    _, tokenizer = hf
    batch = backend.tokenize(PROMPTS)
    for row, text in enumerate(PROMPTS):
        ids = tokenizer(text)["input_ids"]
        assert batch.input_ids[row, : len(ids)].tolist() == ids and int(batch.lengths[row]) == len(ids)
    assert backend.to_str_tokens(PROMPTS[0]) == [tokenizer.decode([i]) for i in tokenizer(PROMPTS[0])["input_ids"]]
    sites = backend.sites(["resid_pre", "z"])
    assert [str(s) for s in sites] == [f"{k}.{layer}" for layer in range(backend.n_layers) for k in ("resid_pre", "z")]
    assert backend.validate_site("z.1.2").head == 2
    with pytest.raises(SiteError, match="layer 99 out of range"):
        backend.validate_site("resid_pre.99")


# ------------------------------------------------------------------ forward passes
def test_logits_and_captures_equal_transformers(backend, hf):
    batch = backend.tokenize(PROMPTS)
    out = backend.run(batch, capture=["resid_pre.0", "resid_pre.2", "resid_post.2"])
    ref = hf[0](input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    real = _real(batch)
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    for layer in (0, 2):
        torch.testing.assert_close(out.cache[f"resid_pre.{layer}"][real], ref.hidden_states[layer][real], **TOL)
    last = backend.run(batch, logits="last").logits
    rows = torch.arange(batch.size)
    torch.testing.assert_close(last, ref.logits[rows, batch.lengths - 1], **TOL)


def test_steering_equals_a_transformers_hook(backend, hf):
    direction = torch.randn(backend.d_model, generator=torch.Generator().manual_seed(1))
    batch = backend.tokenize(PROMPTS)
    got = backend.run(batch, interventions=[steer("resid_pre.1", direction, coeff=3.0, rows=[1])]).logits

    def shifted(hidden):
        hidden = hidden.clone()
        hidden[1] += 3.0 * direction
        return hidden

    def add(module, args, kwargs):  # the stream entering layer 1, row 1 only
        return _with_stream(args, kwargs, shifted)

    want = _hf_logits(hf, batch, add, layer=1)
    real = _real(batch)
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert not torch.allclose(got[1][real[1]], backend.run(batch).logits[1][real[1]])  # the steer did something
    torch.testing.assert_close(got[0][real[0]], backend.run(batch).logits[0][real[0]], **TOL)  # and only to row 1


def test_gradients_equal_transformers_autograd(backend, hf):
    batch = backend.tokenize(CLEAN)
    got = backend.gradients(batch, logit_diff, ["resid_pre.1", "resid_pre.2"], logits="last")
    kept: dict[int, torch.Tensor] = {}

    def keep(layer):
        def leaf(hidden):
            kept[layer] = hidden.detach().requires_grad_(True)
            return kept[layer]

        def hook(module, args, kwargs):
            return _with_stream(args, kwargs, leaf)
        return hook

    model = hf[0]
    handles = [model.model.layers[layer].register_forward_pre_hook(keep(layer), with_kwargs=True) for layer in (1, 2)]
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for handle in handles:
            handle.remove()
    last = logits[torch.arange(batch.size), batch.lengths - 1]
    value = (last[:, ANSWER] - last[:, WRONG]).mean()
    # layer 2's input is a leaf cut from layer 1's graph: its gradient is the total one, and
    # layer 1's is the gradient through layers 1..n given layer 2's leaf, so differentiate separately
    (g2,) = torch.autograd.grad(value, [kept[2]])
    torch.testing.assert_close(got.value, value.detach(), **TOL)
    torch.testing.assert_close(got.grads["resid_pre.2"], g2, **TOL)
    assert got.grads["resid_pre.1"].abs().sum() > 0


def test_generate_equals_transformers_greedy(backend, hf):
    model, tokenizer = hf
    prompt = CLEAN[0]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert backend.generate(prompt, 4) == tokenizer.decode(want[0, ids.shape[1]:])


def test_mid_model_passes_equal_the_full_run(backend):
    batch = backend.tokenize(CORRUPT)
    full = backend.run(batch, capture=[f"resid_pre.{layer}" for layer in range(backend.n_layers)], logits="last")
    last = backend.n_layers - 1
    requests = [
        ("from-1", StageRequest(batch, 1, backend.n_layers, hidden=full.cache["resid_pre.1"], with_head=True, logits="last")),
        ("joins", StageRequest(batch, 0, backend.n_layers, with_head=True, logits="last",
                               joins={0: full.cache["resid_pre.0"][:1], last: full.cache[f"resid_pre.{last}"][1:]})),
        ("vocab", StageRequest(batch, 2, backend.n_layers, hidden=full.cache["resid_pre.2"], with_head=True, logits="last",
                               vocab=torch.tensor([ANSWER, WRONG]))),
    ]
    got: dict[str, torch.Tensor] = {}
    backend.run_stages(iter(requests), got.__setitem__)
    assert sorted(got) == ["from-1", "joins", "vocab"]
    torch.testing.assert_close(got["from-1"], full.logits, **TOL)
    torch.testing.assert_close(got["joins"], full.logits, **TOL)
    torch.testing.assert_close(got["vocab"], full.logits[:, [ANSWER, WRONG]], **TOL)


def test_stage_forward_chain_equals_the_run(backend):
    batch = backend.tokenize(CLEAN)
    full = backend.run(batch, capture=["resid_pre.1"], logits="last")
    hidden = None
    for index, (start, stop) in enumerate(backend.stage_ranges):
        owned = [f"resid_pre.{layer}" for layer in range(start, stop)]
        hidden, cache = backend.stage_forward(index, batch, hidden, capture=owned)
        if "resid_pre.1" in owned:
            torch.testing.assert_close(cache["resid_pre.1"], full.cache["resid_pre.1"], **TOL)
    torch.testing.assert_close(hidden, full.logits, **TOL)
    index = backend.stage_of("resid_pre.1")  # from a layer inside a stage, given the stream there
    if index == len(backend.stage_ranges) - 1:
        out, _ = backend.stage_forward(index, batch, full.cache["resid_pre.1"], start=1)
        torch.testing.assert_close(out, full.logits, **TOL)
    with pytest.raises(ValueError, match="stage"):
        backend.stage_forward(len(backend.stage_ranges), batch, None)


def test_capture_into_a_store_equals_the_run(backend, tmp_path):
    store = open_store(str(tmp_path / "store"))
    writer = store.begin_run("capture", model=backend.name)
    sites = ["resid_pre.0", "z.2", "resid_post.2"]
    prompts = PROMPTS + CORRUPT
    written = backend.capture(prompts, sites, writer, batch_size=2, dtype="float32", skip_chunks=[1])
    writer.commit()
    assert written == 2  # chunks 0 and 2; chunk 1 skipped
    rows = store.sql("SELECT DISTINCT prompt_id FROM activations ORDER BY prompt_id").column("prompt_id").to_pylist()
    assert rows == [0, 1, 4]
    want = backend.run(prompts, capture=sites)
    for site in ("resid_pre.0", "resid_post.2"):
        got, index = store.export(writer.run_id, site, with_index=True)
        expected = want.cache[site][torch.as_tensor(index["prompt_id"]), torch.as_tensor(index["position"])]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ weights
def test_weights_round_trip(backend, hf):
    model, _ = hf
    values = backend.get_parameters()
    assert list(values) == backend.parameter_names() == [n for n, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        torch.testing.assert_close(values[name], param.detach(), rtol=0, atol=0)
    name = "model.layers.2.mlp.down_proj.weight"
    before = backend.run(CLEAN, logits="last").logits
    try:
        assert backend.set_parameters({name: values[name] * 2}) == 1
        assert not torch.allclose(backend.run(CLEAN, logits="last").logits, before)
        with pytest.raises(ValueError, match="unknown parameter 'nope'"):
            backend.set_parameters({"model.norm.weight": values["model.norm.weight"] * 0, "nope": values[name]})
        torch.testing.assert_close(backend.get_parameters()["model.norm.weight"], values["model.norm.weight"], rtol=0, atol=0)
    finally:
        backend.set_parameters({name: values[name]})
    torch.testing.assert_close(backend.run(CLEAN, logits="last").logits, before, rtol=0, atol=0)


def test_trainer_step_equals_torch_adam(backend, hf):
    model, _ = hf
    values = backend.get_parameters()
    trainable = ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"]
    adam = AdamConfig(lr=1e-2)
    batch = backend.tokenize(PROMPTS)
    try:
        with backend.trainer(adam, trainable) as trainer:
            loss = trainer.step(batch, next_token_loss)
        got = backend.get_parameters()
    finally:
        backend.set_parameters(values)
    reference = {n: p.detach().clone().requires_grad_(n in trainable) for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([reference[n] for n in trainable], lr=1e-2)
    logits = torch.func.functional_call(model, reference, (), {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}).logits
    want_loss = next_token_loss(logits, batch)
    want_loss.backward()
    optimizer.step()
    torch.testing.assert_close(loss, want_loss.detach(), **TOL)
    for name in values:
        torch.testing.assert_close(got[name], reference[name].detach(), rtol=1e-5, atol=1e-4)  # Adam: ~lr * 1e-2 where a gradient is ~0
    assert not torch.equal(got[trainable[0]], values[trainable[0]])  # the step moved what it trains
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], values["model.layers.2.mlp.up_proj.weight"])


# ------------------------------------------------------------------ errors keep their type
def _local_error(call) -> type[BaseException]:
    with pytest.raises(Exception) as info:
        call(load_model(MODEL))
    return type(info.value)


@pytest.mark.parametrize("case", ["value does not fit", "metric raises", "torch shape error"])
def test_errors_are_the_local_backends_classes(backend, case):
    def failing_metric(logits, batch):
        raise ZeroDivisionError("metric exploded")

    calls = {
        "value does not fit": lambda m: m.run(CLEAN, interventions=[Intervention("resid_pre.2", "set", value=torch.ones(7), rows=[1])]),
        "metric raises": lambda m: m.gradients(CLEAN, failing_metric, ["resid_pre.1"]),
        "torch shape error": lambda m: m.run(CLEAN, interventions=[Intervention("resid_pre.2", "add", value=torch.ones(3))]),
    }
    want = _local_error(calls[case])
    assert want is {"value does not fit": InterventionError, "metric raises": ZeroDivisionError,
                    "torch shape error": RuntimeError}[case]
    with pytest.raises(want) as info:
        calls[case](backend)
    assert type(info.value) is want
    if backend.local_model is None:  # raised in a stage actor: where, and the actor's traceback, come along
        where = info.value.__cause__
        assert where is not None and "Traceback" in where.remote_traceback and where.prompt_ids
    backend.run(CLEAN, logits="last")  # still usable
