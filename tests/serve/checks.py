"""Checks run against a RemoteModel over any transport (in-process, or Ray Serve over HTTP): its
numbers equal the local model's, its errors are the local classes, what it refuses it refuses clearly."""

from __future__ import annotations

import pytest
import torch

from interplab.engine import Intervention, InterventionError, SiteError, StageRequest, TokenizationError, patch, steer
from interplab.engine.plan import KVPrefix
from interplab.serve import ReadOnlyModelError, TokenMetric
from tests.serve.helpers import ANSWER, CLEAN, CORRUPT, PROMPTS, TOL, WRONG


def assert_run_equal(got, want):
    if want.logits is None:
        assert got.logits is None
    else:
        torch.testing.assert_close(got.logits, want.logits, **TOL)
    assert [str(s) for s in got.cache] == [str(s) for s in want.cache]
    for site in want.cache:
        torch.testing.assert_close(got.cache[site], want.cache[site], **TOL)
    assert torch.equal(got.cache.positions, want.cache.positions) and torch.equal(got.cache.valid, want.cache.valid)
    assert torch.equal(got.batch.input_ids, want.batch.input_ids) and torch.equal(got.batch.lengths, want.batch.lengths)


def check_shape_tokens_and_sites(remote, local):
    for attr in ("name", "weight_hash", "n_layers", "n_heads", "n_kv_heads", "d_model", "head_dim", "d_mlp", "d_vocab", "has_resid_mid"):
        assert getattr(remote, attr) == getattr(local, attr), attr
    assert remote.spec is local.spec and remote.info["device"] == str(local.device)
    for field, value in local.config.to_dict().items():  # every field, as the served config's attribute
        if field not in ("transformers_version", "dtype", "torch_dtype"):
            assert getattr(remote.config, field) == value, field
    assert remote.config.to_transformers().to_dict()["hidden_size"] == local.config.hidden_size
    assert remote.local_model is None and remote.stage_of("embed") == 0
    batch, want = remote.tokenize(PROMPTS), local.tokenize(PROMPTS)
    assert torch.equal(batch.input_ids, want.input_ids) and batch.texts == want.texts
    assert remote.to_str_tokens(PROMPTS[0]) == local.to_str_tokens(PROMPTS[0])
    assert remote.tokenizer(" Mary")["input_ids"] == local.tokenizer(" Mary")["input_ids"]
    assert remote.tokenizer.decode([5, 9]) == local.tokenizer.decode([5, 9])
    assert remote.sites() == local.sites() and remote.sites(["z", "resid_pre"]) == local.sites(["z", "resid_pre"])
    assert remote.validate_site("z.1.2").head == 2
    with pytest.raises(SiteError, match="layer 99 out of range"):
        remote.validate_site("resid_pre.99")


def run_cases(model):
    """(name, callable(model) -> RunResult) for many kinds of run."""
    clean_cache = model.run(CLEAN, capture=["resid_pre.1", "z.2"]).cache
    n = 4
    rows = torch.arange(n)
    return {
        "captures": lambda m: m.run(PROMPTS, capture=["embed", "resid_pre.1", "z.2.1", "pattern.1", "head_out.2", "logits"]),
        "steer one row": lambda m: m.run(PROMPTS, capture=["resid_post.2"],
                                         interventions=[steer("resid_pre.1", torch.linspace(-1, 1, 64), 3.0, rows=[1])]),
        "paired patches": lambda m: m.run(m.tokenize([CORRUPT[0]] * n), logits="last", interventions=[
            patch("resid_pre.1", clean_cache["resid_pre.1"][:1].expand(n, -1, -1), rows=rows, positions=rows, paired=True)]),
        "head patch": lambda m: m.run(CORRUPT, positions=[-1], capture=["z.2"], logits="last", interventions=[
            patch("z.2", clean_cache["z.2"], heads=[1, 3], rows=[0, 1], positions=[-1, -1], paired=True)]),
        "token batch, per-row positions": lambda m: m.run(m.tokenize(PROMPTS), capture=["mlp_post.0"],
                                                          positions=torch.tensor([[0, 1], [2, 3], [4, 0]]), logits="none"),
        "scale and keys/values": lambda m: m.run(CLEAN, interventions=[Intervention("mlp_out.1", "scale", value=0.5)], keep_kv=True),
    }


def check_runs(remote, local):
    for name, case in run_cases(local).items():
        got, want = case(remote), case(local)
        assert_run_equal(got, want)
        if want.kv is not None:
            assert sorted(got.kv) == sorted(want.kv), name
            for layer, (k, v) in want.kv.items():
                torch.testing.assert_close(got.kv[layer][0], k, **TOL)
                torch.testing.assert_close(got.kv[layer][1], v, **TOL)


def check_gradients(remote, local):
    metric = TokenMetric("logit_diff", answer=ANSWER, wrong=WRONG)
    for kwargs in ({"logits": "last"}, {"logits": "all", "capture": ["resid_pre.2"], "positions": [-1],
                                        "interventions": [steer("resid_pre.1", torch.ones(64), 0.5)]}):
        got = remote.gradients(CLEAN, metric, ["resid_pre.1", "z.1"], **kwargs)
        want = local.gradients(CLEAN, metric, ["resid_pre.1", "z.1"], **kwargs)
        torch.testing.assert_close(got.value, want.value, **TOL)
        torch.testing.assert_close(got.logits, want.logits, **TOL)
        for site in want.grads:
            torch.testing.assert_close(got.grads[site], want.grads[site], **TOL)
        for site in want.cache:
            torch.testing.assert_close(got.cache[site], want.cache[site], **TOL)
    value = remote.gradients(PROMPTS, TokenMetric("logprob", answer=[ANSWER, WRONG, 3], reduce="sum"), ["resid_pre.0"]).value
    torch.testing.assert_close(value, local.gradients(PROMPTS, TokenMetric("logprob", answer=[ANSWER, WRONG, 3], reduce="sum"),
                                                      ["resid_pre.0"]).value, **TOL)


def check_generate(remote, local):
    assert remote.generate(CLEAN[0], 4) == local.generate(CLEAN[0], 4)
    zeroed = [Intervention("resid_post.1", "set", value=0.0, positions=[-1])]
    assert remote.generate(CLEAN[1], 3, interventions=zeroed) == local.generate(CLEAN[1], 3, interventions=zeroed)


def check_stage_passes(remote, local):
    batch = local.tokenize(CORRUPT)
    full = local.run(batch, capture=[f"resid_pre.{layer}" for layer in range(local.n_layers)], logits="last", keep_kv=True)
    last = local.n_layers - 1
    requests = [
        ("from-1", StageRequest(batch, 1, local.n_layers, hidden=full.cache["resid_pre.1"], with_head=True, logits="last")),
        ("joins", StageRequest(batch, 0, local.n_layers, with_head=True, logits="last",
                               joins={0: full.cache["resid_pre.0"][:1], last: full.cache[f"resid_pre.{last}"][1:]})),
        ("vocab", StageRequest(batch, 2, local.n_layers, hidden=full.cache["resid_pre.2"], with_head=True, logits="last",
                               vocab=torch.tensor([ANSWER, WRONG]))),
        ("hidden out", StageRequest(batch, 0, 2, interventions=(steer("resid_pre.1", torch.ones(64)),))),
    ]
    # positions before 2 from the full run's keys/values: each row's own copy, and one copy per prompt
    # shared by rows (rows 1, 0, 1 of the batch)
    p, shared = 2, torch.tensor([1, 0, 1])
    kv = {layer: (k[:, :, :p], v[:, :, :p]) for layer, (k, v) in full.kv.items()}
    requests += [
        ("prefix", StageRequest(batch, 1, local.n_layers, hidden=full.cache["resid_pre.1"][:, p:], with_head=True, logits="last",
                                prefix=KVPrefix(p, kv))),
        ("prefix rows", StageRequest(batch.select(shared), 1, local.n_layers, hidden=full.cache["resid_pre.1"][shared, p:],
                                     with_head=True, logits="last", prefix=KVPrefix(p, kv, rows=shared))),
    ]
    got: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    remote.run_stages(iter(requests), got.__setitem__)
    local.run_stages(iter(requests), want.__setitem__)
    assert sorted(got) == sorted(want)
    torch.testing.assert_close(want["prefix"], full.logits, **TOL)  # the prefix stands in for the positions it holds
    torch.testing.assert_close(want["prefix rows"], full.logits[shared], **TOL)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL)
    hidden = None  # stage after stage, as an analysis carrying its own state does
    for index, (start, stop) in enumerate(remote.stage_ranges):
        owned = [f"resid_pre.{layer}" for layer in range(start, stop)]
        hidden, cache = remote.stage_forward(index, batch, hidden, capture=owned)
        for site in owned:
            torch.testing.assert_close(cache[site], full.cache[site], **TOL)
    torch.testing.assert_close(hidden, full.logits, **TOL)
    index = remote.stage_of("resid_pre.1")  # from a layer inside a stage, given the stream there
    out, _ = remote.stage_forward(index, batch, full.cache["resid_pre.1"], start=1)
    stop = remote.stage_ranges[index][1]
    want_out = full.logits if stop == local.n_layers else local.run_stage(batch, start=1, stop=stop, hidden=full.cache["resid_pre.1"])[0]
    torch.testing.assert_close(out, want_out, **TOL)


ERROR_CASES = {
    "unknown site": lambda m: m.run(CLEAN, capture=["resid_pre.99"]),
    "value does not fit": lambda m: m.run(CLEAN, interventions=[Intervention("resid_pre.2", "set", value=torch.ones(7), rows=[1])]),
    "torch shape error": lambda m: m.run(CLEAN, interventions=[Intervention("resid_pre.2", "add", value=torch.ones(3))]),
    "rows out of range": lambda m: m.run(CLEAN, interventions=[Intervention("resid_pre.2", "set", value=0.0, rows=[5])]),
    "positions out of range": lambda m: m.run(CLEAN, capture=["resid_pre.1"], positions=[99]),
    "no prompts": lambda m: m.run([]),
    "stage out of range": lambda m: m.stage_forward(7, m.tokenize(CLEAN), None),
}


def check_errors_keep_their_class(remote, local):
    for name, case in ERROR_CASES.items():
        with pytest.raises(Exception) as want:
            case(local)
        with pytest.raises(type(want.value)) as got:
            case(remote)
        assert type(got.value) is type(want.value), name
        assert type(want.value) in (SiteError, InterventionError, RuntimeError, ValueError, TokenizationError), name
    remote.run(CLEAN, logits="last")  # still serving


def check_refusals(remote):
    with pytest.raises(TypeError, match="declared metrics only"):
        remote.gradients(CLEAN, lambda logits, batch: logits.sum(), ["resid_pre.1"])
    with pytest.raises(TypeError, match="Python callable"):
        remote.run(CLEAN, interventions=[Intervention("resid_pre.1", "apply", fn=lambda x: x * 2)])
    with pytest.raises(ReadOnlyModelError, match="read-only"):
        remote.trainer()
    with pytest.raises(ReadOnlyModelError, match="read-only"):
        remote.set_parameters({})
    with pytest.raises(NotImplementedError, match="does not send its weights"):
        remote.get_parameters()
    with pytest.raises(ValueError, match="grad=True"):
        remote.run(CLEAN, grad=True)


def check_malformed_then_good(post, remote, local, cases):
    """``post(op, body) -> (status, json)`` every malformed request, then a good one still answers right."""
    assert len(cases) >= 25
    for name, op, body, status, text in cases:
        got_status, payload = post(op, body)
        assert got_status == status, (name, got_status, payload)
        assert text in payload["error"]["message"], (name, payload)
    want = local.run(PROMPTS, capture=["resid_pre.1"], logits="last")
    assert_run_equal(remote.run(PROMPTS, capture=["resid_pre.1"], logits="last"), want)
