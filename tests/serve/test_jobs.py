"""Jobs on a served model: ``model: serve://NAME`` with ``service: {url, token_env}``.

The job loads nothing and starts no Ray: its chunks run in the driver, each forward pass a request to
the service. Its rows equal the same job run on a local copy of the model, and its run records the
service, the weights hash and the token's user.
"""

from __future__ import annotations

import pytest
from interplab.jobs.errors import SpecError, SpecErrors
from interplab.jobs.registry import parse_spec

from tests.serve.helpers import ALICE, BOB, MODEL

PAIRS = [
    {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Mary and John went to the store, Mary gave a drink to",
        "answer": " Mary",
        "wrong": " John",
    },
    {
        "clean": "When Tom and Alice went to the park, Alice gave a ball to",
        "corrupted": "When Tom and Alice went to the park, Tom gave a ball to",
        "answer": " Tom",
        "wrong": " Alice",
    },
]
TOKEN_ENV = "INTERPLAB_TEST_SERVE_TOKEN"
KEYS = ("sweep", "method", "layer", "position", "head")


def patching(**fields) -> dict:
    raw = {
        "kind": "patching",
        "model": MODEL,
        "prompts": PAIRS,
        "method": "exact",
        "metric": "logit_diff",
        "sweep": ["resid_pre", {"site": "head_out", "by": ["layer", "head"]}],
        "resources": {"num_cpus": 0.2, "num_gpus": 0},
    }
    return {**raw, **fields}


def served(url: str, **fields) -> dict:
    return patching(**{"model": f"serve://{MODEL}", "service": {"url": url, "token_env": TOKEN_ENV}, **fields})


# --------------------------------------------------------------------------- the spec (no service needed)
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "serve://tiny-llama"}, "is a served model: add service"),
        ({"service": {"url": "http://127.0.0.1:8000"}}, "is not a served model: use model: serve://NAME"),
        ({"model": "serve://tiny-llama", "service": {"url": "http://x:1"}, "parallel": {"stages": 2}}, "remove parallel"),
        ({"model": "serve://tiny-llama", "service": {"url": "127.0.0.1:8000"}}, "service.url"),
        ({"model": "serve://tiny-llama", "service": {"url": "http://x:1", "token_env": "not a name"}}, "service.token_env"),
        ({"model": "serve://tiny-llama", "service": {"url": "http://x:1", "token": "secret"}}, "service.token"),
    ],
)
def test_served_model_spec_errors(fields, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        parse_spec(patching(**fields))


def test_spec_record_keeps_no_token_and_no_service_key_for_local_models():
    local = parse_spec(patching())
    assert "service" not in local.to_record()
    remote = parse_spec(served("http://127.0.0.1:8000"))
    assert remote.to_record()["service"] == {"url": "http://127.0.0.1:8000", "token_env": TOKEN_ENV}
    assert parse_spec(remote.to_record()) == remote


def test_prepare_names_the_field_to_fix_before_any_run(tmp_path, monkeypatch):
    import socket

    from interplab.jobs.prepare import prepare

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = served(f"http://127.0.0.1:{port}")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SpecError, match=f"service.token_env: \\${TOKEN_ENV} is not set"):
        prepare(raw, store=str(tmp_path / "store"))
    monkeypatch.setenv(TOKEN_ENV, ALICE)
    with pytest.raises(SpecError, match="service.url: cannot use the service"):
        prepare(raw, store=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- on a real Ray Serve
@pytest.mark.slow
def test_prepare_refuses_a_wrong_token_and_an_unknown_model(served_tiny, tmp_path, monkeypatch):
    from interplab.jobs.prepare import prepare

    monkeypatch.setenv(TOKEN_ENV, "nobody-knows-this-token-0123")
    with pytest.raises(SpecError, match="service.token_env: the service refused the token"):
        prepare(served(served_tiny.url), store=str(tmp_path / "store"))
    monkeypatch.setenv(TOKEN_ENV, ALICE)
    with pytest.raises(SpecError, match="model: no model named 'gpt-17'"):
        prepare(served(served_tiny.url, model="serve://gpt-17"), store=str(tmp_path / "store"))


@pytest.mark.slow
def test_patching_job_on_a_served_model_equals_the_local_job(served_tiny, local_tiny, tmp_path, monkeypatch):
    import ray
    from interplab.analyses.patching.job import PatchingRunner
    from interplab.jobs.execute import run_job
    from interplab.jobs.prepare import prepare
    from interplab.store import open_store

    from tests.analyses.jobs_inline import run_job as run_inline

    monkeypatch.setenv(TOKEN_ENV, BOB)
    monkeypatch.delenv("INTERPLAB_USER", raising=False)  # the owner then comes from the token
    uri = str(tmp_path / "store")
    job, uri = prepare(served(served_tiny.url), store=uri)

    def refuse(*args, **kwargs):
        raise AssertionError("the served job started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    lines: list[str] = []
    result = run_job(job, uri, progress=False, echo=lines.append)
    assert result.n_computed == 2 and any("no model load" in line for line in lines), lines

    store = open_store(uri)
    local_spec = parse_spec(patching())
    local_run, _ = run_inline(PatchingRunner(), "patching", local_spec, local_tiny, store)
    query = f"SELECT {', '.join(KEYS)}, value, normalized FROM patching WHERE run_id = $r ORDER BY {', '.join(KEYS)}"
    got = store.sql(query, {"r": result.run_id}).to_pylist()
    want = store.sql(query, {"r": local_run}).to_pylist()
    n_positions = local_tiny.tokenize(PAIRS[0]["clean"]).seq_len
    assert len(got) == len(want) == local_tiny.n_layers * (n_positions + local_tiny.n_heads)
    base = "SELECT name, value FROM baselines WHERE run_id = $r AND sweep = '' ORDER BY name"
    baselines = {r["name"]: r["value"] for r in store.sql(base, {"r": local_run}).to_pylist()}
    served_baselines = {r["name"]: r["value"] for r in store.sql(base, {"r": result.run_id}).to_pylist()}
    assert served_baselines.keys() == baselines.keys() == {"clean", "corrupted"}
    for name, value in baselines.items():
        assert served_baselines[name] == pytest.approx(value, rel=1e-6, abs=1e-6)
    # the replica (one thread) sums in another order than this process: fp32 rounding, 1e-6 on the
    # metric; normalized is the metric divided by (clean - corrupted), so its tolerance is too
    span = 1e-6 / abs(baselines["clean"] - baselines["corrupted"])
    for g, w in zip(got, want):
        assert {k: g[k] for k in KEYS} == {k: w[k] for k in KEYS}
        assert g["value"] == pytest.approx(w["value"], rel=1e-6, abs=1e-6), (g, w)
        assert g["normalized"] == pytest.approx(w["normalized"], rel=1e-6, abs=span), (g, w)

    info = store.run(result.run_id)
    assert info.status == "committed" and info.weight_hash == local_tiny.weight_hash
    service = info.provenance["service"]
    assert service["url"] == served_tiny.url and service["name"] == served_tiny.name
    assert service["weight_hash"] == local_tiny.weight_hash and service["model"] == local_tiny.name
    assert service["user"] == "bob" and info.owner == "bob"  # the token's user: the run's owner
    assert info.provenance["host_device"] == "service"
    assert info.spec["model"] == f"serve://{MODEL}" and BOB not in str(info.spec) and BOB not in str(info.provenance)
