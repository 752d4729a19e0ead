"""A pipeline of 1, 2 and 3 stages gives the single-process engine's answers (float32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from interplab import load_model
from interplab.analyses.patching import Sweep, activation_patching
from interplab.analyses.tasks import PairSet, ioi_pairs
from interplab.engine import StageRequest, steer, zero
from interplab.engine.plan import KVPrefix
from interplab.runtime import AdamConfig, make_trainer
from tests.runtime.helpers import ANSWER, CLEAN, CORRUPT, WRONG, logit_diff, next_token_loss, resid_sweep, sites_of

pytestmark = pytest.mark.slow  # real Ray actors: ~10 s of start-up per pipeline

CASES = [("llama", 1), ("llama", 2), ("llama", 3), ("gpt2", 2), ("qwen2", 3), ("gemma2", 2)]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}stage" for f, s in CASES])
def case(request, pipelines):
    family, stages = request.param
    pipe = pipelines.get(f"tiny-{family}", stages=stages, micro_batches=2)
    return load_model(f"tiny-{family}"), pipe


def test_split_and_surface(case):
    ref, pipe = case
    assert pipe.n_layers == ref.n_layers and pipe.d_model == ref.d_model and pipe.n_heads == ref.n_heads
    assert pipe.stage_ranges[0][0] == 0 and pipe.stage_ranges[-1][1] == ref.n_layers
    assert pipe.sites() == ref.sites() and pipe.weight_hash == ref.weight_hash
    assert torch.equal(pipe.tokenize(CLEAN).input_ids, ref.tokenize(CLEAN).input_ids)


@pytest.mark.parametrize("positions", [None, [-1, 0]], ids=["all", "some"])
def test_captures_and_logits(case, positions):
    ref, pipe = case
    prompts = CLEAN + ["Mary lives in", "The city of Paris is in France"]  # padded rows too
    sites = sites_of(ref)
    want = ref.run(prompts, capture=sites, positions=positions)
    got = pipe.run(prompts, capture=sites, positions=positions)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    assert list(got.cache) == list(want.cache)
    for site in sites:
        torch.testing.assert_close(got.cache[site], want.cache[site], **TOL, msg=site)
    assert torch.equal(got.cache.positions, want.cache.positions) and torch.equal(got.cache.valid, want.cache.valid)


def test_capture_only_stops_early(case):
    ref, pipe = case
    got = pipe.run(CLEAN, capture=["resid_post.0"], logits="none")
    assert got.logits is None
    torch.testing.assert_close(got.cache["resid_post.0"], ref.run(CLEAN, capture=["resid_post.0"]).cache["resid_post.0"], **TOL)


def test_interventions_routed_to_their_stage(case):
    ref, pipe = case
    direction = torch.randn(ref.d_model, generator=torch.Generator().manual_seed(0))
    items = [zero("z.0", heads=[1, 3], rows=[0, 1], positions=[-1, -2], paired=True),
             steer("resid_pre.2", direction, coeff=2.0, rows=[1]),
             zero("mlp_post.1", positions=[3])]
    want = ref.run(CLEAN * 2, interventions=items, capture=["resid_post.2"])
    got = pipe.run(CLEAN * 2, interventions=items, capture=["resid_post.2"])
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.cache["resid_post.2"], want.cache["resid_post.2"], **TOL)


def test_patching_sweep(case):
    ref, pipe = case
    layers = range(ref.n_layers)
    torch.testing.assert_close(resid_sweep(pipe, CLEAN, CORRUPT, layers), resid_sweep(ref, CLEAN, CORRUPT, layers), **TOL)


def test_run_stage_with_joins_prefix_and_vocab(case):
    """Rows starting at different layers, a cached key/value prefix and a vocabulary subset: the
    pipeline's run_stage equals the engine's (what patching sweeps send through it)."""
    ref, pipe = case
    batch = ref.tokenize(CORRUPT * 2)
    full = ref.run(batch, capture=[f"resid_pre.{layer}" for layer in range(ref.n_layers)], logits="none", keep_kv=True)
    got_kv = pipe.run(batch, logits="last", keep_kv=True).kv
    assert sorted(got_kv) == sorted(full.kv)
    for layer, (k, v) in full.kv.items():
        torch.testing.assert_close(got_kv[layer][0], k, **TOL)
        torch.testing.assert_close(got_kv[layer][1], v, **TOL)
    p = 3  # positions before p come from the prefix
    prefix = KVPrefix(p, {layer: (k[:, :, :p], v[:, :, :p]) for layer, (k, v) in full.kv.items()})
    last = ref.n_layers - 1
    joins = {0: full.cache["resid_pre.0"][:1, p:], 1: full.cache["resid_pre.1"][1:3, p:],
             last: full.cache[f"resid_pre.{last}"][3:, p:]}
    items = [steer(f"resid_pre.{last}", torch.ones(ref.d_model), coeff=0.5, rows=[0, 3], positions=[-1]),
             zero("z.1", heads=[0], rows=[2], positions=[1])]
    vocab = torch.tensor([ANSWER, WRONG, 2])
    hidden = full.cache["resid_pre.1"]  # plain hidden states from a later layer, whole vocabulary
    requests = [
        ("joins", StageRequest(batch, 0, ref.n_layers, with_head=True, joins=joins, interventions=items, logits="last",
                               prefix=prefix, vocab=vocab)),
        ("hidden", StageRequest(batch, 1, ref.n_layers, hidden=hidden, with_head=True, logits="last")),
        # one prefix copy per prompt (the batch is the two prompts twice), each row naming its own
        ("shared prefix", StageRequest(batch, 1, ref.n_layers, hidden=hidden[:, p:], with_head=True, logits="last",
                                       prefix=KVPrefix(p, {layer: (k[:2], v[:2]) for layer, (k, v) in prefix.kv.items()},
                                                       rows=torch.tensor([0, 1, 0, 1])))),
    ]
    want: dict[str, torch.Tensor] = {}
    got: dict[str, torch.Tensor] = {}
    ref.run_stages(requests, want.__setitem__)
    pipe.run_stages(requests, got.__setitem__)
    assert got["joins"].shape == (4, 3) and got["hidden"].shape == (4, ref.d_vocab)
    for key in ("joins", "hidden", "shared prefix"):
        torch.testing.assert_close(got[key], want[key], **TOL)
    torch.testing.assert_close(want["shared prefix"], want["hidden"], rtol=0, atol=3e-5)  # the prefix stands in for positions < p
    alone, _ = ref.run_stage(batch, start=1, stop=ref.n_layers, hidden=hidden, with_head=True, logits="last")
    torch.testing.assert_close(want["hidden"], alone, rtol=0, atol=0)  # run_stages is run_stage, request by request


def test_activation_patching(case):
    """The patching driver on a pipeline: rows start at their own layer through the stages, and the
    results equal the single-process engine's."""
    ref, pipe = case
    pairs = PairSet.tokenize(ref.tokenizer, ioi_pairs(ref.tokenizer, 3, seed=1))
    sweeps = [Sweep("resid_pre"), Sweep("z", ("layer", "head"))]
    want = activation_patching(ref, pairs, sweeps, batch_rows=16)
    got = activation_patching(pipe, pairs, sweeps, batch_rows=16)
    assert (got.rows_run, got.rows_unchanged) == (want.rows_run, want.rows_unchanged)
    for sweep in ("resid_pre", "z"):
        torch.testing.assert_close(got.values(sweep, "exact"), want.values(sweep, "exact"), **TOL)


def test_site_gradients(case):
    ref, pipe = case
    sites = [s for s in sites_of(ref) if s != "logits"]
    items = [steer("resid_pre.1", torch.ones(ref.d_model), coeff=0.1)]
    want = ref.gradients(CLEAN * 2, logit_diff, sites, interventions=items, capture=["resid_pre.1"], logits="last")
    got = pipe.gradients(CLEAN * 2, logit_diff, sites, interventions=items, capture=["resid_pre.1"], logits="last")
    torch.testing.assert_close(got.value, want.value, **TOL)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    for site in sites:
        torch.testing.assert_close(got.grads[site], want.grads[site], **TOL, msg=site)
    torch.testing.assert_close(got.cache["resid_pre.1"], want.cache["resid_pre.1"], **TOL)


def test_adam_step(case, pipelines):
    """Last in the module for each case: it changes the pipeline's weights (the pipeline is dropped after)."""
    _, pipe = case
    ref = load_model(pipe.name)  # a fresh copy: the shared one must not be trained
    adam = AdamConfig(lr=1e-3, eps=1e-4)
    prompts = CLEAN + ["Mary lives in"]
    want_loss = make_trainer(ref, adam).step(prompts, next_token_loss)
    got_loss = make_trainer(pipe, adam).step(prompts, next_token_loss)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    stage_params = pipe.stage_parameters()
    ref_params = dict(ref.model.named_parameters(remove_duplicate=False))
    for name, value in stage_params.items():
        torch.testing.assert_close(value, ref_params[name].detach(), **TOL, msg=name)
    expected = {n for n, p in ref.model.named_parameters()}  # every parameter is held by some stage
    assert expected <= set(stage_params)
    pipelines.discard(pipe)
