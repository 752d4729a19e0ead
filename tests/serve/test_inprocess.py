"""The service's request path in this process (no Ray): the same frames, checks, batching and error
answers as behind Ray Serve, against the local tiny model."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from interplab.engine import Intervention
from interplab.serve import AuthError, LimitError, UnknownModelError
from interplab.serve.wire import Frame
from tests.serve import checks
from tests.serve.helpers import ALICE, BATCH_TOL, BOB, CLEAN, PROMPTS, malformed_requests


@pytest.fixture(scope="module")
def remote(inproc):
    return inproc.model()


def test_shape_tokens_and_sites(remote, local_tiny):
    checks.check_shape_tokens_and_sites(remote, local_tiny)


def test_runs_equal_local(remote, local_tiny):
    checks.check_runs(remote, local_tiny)


def test_gradients_equal_local(remote, local_tiny):
    checks.check_gradients(remote, local_tiny)


def test_generate_equals_local(remote, local_tiny):
    checks.check_generate(remote, local_tiny)


def test_stage_passes_equal_local(remote, local_tiny):
    checks.check_stage_passes(remote, local_tiny)


def test_errors_keep_their_class(remote, local_tiny):
    checks.check_errors_keep_their_class(remote, local_tiny)


def test_refusals(remote):
    checks.check_refusals(remote)


def test_malformed_requests_then_a_good_one(inproc, remote, local_tiny):
    def post(op, body):
        answer = inproc.raw(op, body)
        return answer.status, json.loads(answer.body)

    checks.check_malformed_then_good(post, remote, local_tiny, malformed_requests())


def test_tokens(make_server):
    transport = make_server()
    assert transport.model().user == "alice"
    assert transport.as_user(BOB).model().user == "bob"
    body = Frame().encode({"model": "tiny-llama"})
    for header in (None, "", "Bearer", "Basic " + ALICE, "Bearer not-a-token-of-anyone", f"Bearer {ALICE}x"):
        answer = transport.raw("info", body, authorization=header or "")
        assert answer.status == 401, header
        assert json.loads(answer.body)["error"]["type"] == "AuthError"
    with pytest.raises(AuthError, match="unknown token"):
        transport.as_user("x" * 20).model()


def test_limits_name_themselves(make_server, local_tiny):
    small = make_server(limits={"max_rows": 3, "max_tokens": 40, "max_tensor_bytes": 4096, "max_response_bytes": 100_000,
                                "max_new_tokens": 3, "max_stage_requests": 1, "max_json_bytes": 2000})
    remote = small.model()
    tight = make_server(limits={"max_request_bytes": 1000}).model()
    long = " ".join(["Mary"] * 50)
    cases = {
        "max_rows": lambda: remote.run(CLEAN * 2),
        "max_tokens": lambda: remote.run([long, long]),
        "max_tensor_bytes": lambda: remote.run(CLEAN, interventions=[Intervention("resid_pre.1", "set", value=torch.ones(2, 14, 64))]),
        "max_response_bytes": lambda: remote.run(CLEAN, capture=["pattern.0", "pattern.1", "z.0", "z.1"]),
        "max_new_tokens": lambda: remote.generate("Mary", 4),
        "max_json_bytes": lambda: remote.run(CLEAN, positions=list(range(0, 500))),
        "max_request_bytes": lambda: tight.run(CLEAN, interventions=[Intervention("resid_pre.1", "set", value=torch.ones(14, 64))]),
    }
    for limit, case in cases.items():
        with pytest.raises(LimitError, match=f"limit {limit}=") as info:
            case()
            pytest.fail(f"{limit}: not refused")
        assert info.value.limit == limit
    out = remote.run(CLEAN, logits="last")  # within every limit
    torch.testing.assert_close(out.logits, local_tiny.run(CLEAN, logits="last").logits, rtol=1e-6, atol=1e-6)
    stages = small.model().info["limits"]["max_stage_requests"]
    assert stages == 1


def test_unknown_model_is_named(inproc):
    with pytest.raises(UnknownModelError, match="serves 'tiny-llama'"):
        inproc.model("gpt-17")


def test_two_users_patching_the_same_site_at_once_get_their_own_rows(make_server, local_tiny):
    """The batch waits for both (max_requests=2, a long window): one merged pass, each its own result."""
    transport = make_server(batching={"window_ms": 60_000, "max_requests": 2})
    clients = [transport.model(), transport.as_user(BOB).model()]
    values = [torch.full((64,), 3.0), torch.full((64,), -2.0)]
    prompts = [CLEAN, ["The city of Paris is in"]]
    barrier = threading.Barrier(2)
    got: dict[int, object] = {}

    def work(i):
        barrier.wait(timeout=60)
        got[i] = clients[i].run(prompts[i], capture=["resid_pre.2"], logits="last",
                                interventions=[Intervention("resid_pre.1", "set", value=values[i], positions=[-1])])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == [0, 1]
    stats = transport.server.stats()["batching"]
    assert stats["batch_sizes"] == {"2": 1} and stats["per_user"] == {"alice": 1, "bob": 1}
    for i in range(2):
        want = local_tiny.run(prompts[i], capture=["resid_pre.2"], logits="last",
                              interventions=[Intervention("resid_pre.1", "set", value=values[i], positions=[-1])])
        torch.testing.assert_close(got[i].logits, want.logits, **BATCH_TOL)
        torch.testing.assert_close(got[i].cache["resid_pre.2"], want.cache["resid_pre.2"], **BATCH_TOL)


def test_the_model_is_built_and_its_answers_copied_in_the_model_thread(local_tiny, tmp_path, monkeypatch):
    """Torch's parallel kernels run in one thread team: the backend is built and run, requests big
    enough for parallel copies and checks are read, and answers big enough for a parallel copy are
    copied into frames, in the replica's model thread; small requests are read in the event loop."""
    from interplab.serve.auth import TokenAuth
    from interplab.serve.limits import BatchingConfig, ServeLimits
    from interplab.serve.server import Server
    from interplab.serve.service import ModelService
    from tests.serve.helpers import InProcess, write_tokens

    threads = {}

    def build():
        threads["build"] = threading.current_thread().name
        return local_tiny

    encode = ModelService.encode_run

    def encode_run(self, *args):
        threads["encode"] = threading.current_thread().name
        return encode(self, *args)

    parse = ModelService.parse

    def parse_in(self, op, header, tensors, user):
        threads.setdefault("parse", []).append((op, sum(t.numel() for t in tensors.values()), threading.current_thread().name))
        return parse(self, op, header, tensors, user)

    monkeypatch.setattr(ModelService, "encode_run", encode_run)
    monkeypatch.setattr(ModelService, "parse", parse_in)
    server = Server(build, name="tiny-llama", auth=TokenAuth(write_tokens(tmp_path)), limits=ServeLimits(),
                    batching=BatchingConfig())
    transport = InProcess(server)
    try:
        model = transport.model()
        got = model.run(PROMPTS, logits="all").logits  # 3 x 14 x 1128 logits: a parallel copy
        # 2.1 MB of values: sent whole, and sent as 3 distinct rows (a small body, big once made whole)
        values = [torch.randn(600, 14, 64, generator=torch.Generator().manual_seed(0)), torch.randn(3, 14, 64).repeat(200, 1, 1)]
        steered = [model.run(PROMPTS * 200, interventions=[Intervention("resid_pre.1", "add", value=v)], logits="last").logits
                   for v in values]
    finally:
        transport.close()
    torch.testing.assert_close(got, local_tiny.run(PROMPTS, logits="all").logits, rtol=1e-6, atol=1e-6)
    for value, answer in zip(values, steered):
        want = local_tiny.run(PROMPTS * 200, interventions=[Intervention("resid_pre.1", "add", value=value)], logits="last")
        torch.testing.assert_close(answer, want.logits, rtol=1e-6, atol=1e-6)
    assert threads["build"].startswith("interplab-model") and threads["encode"] == threads["build"], threads
    runs = [(elements, name) for op, elements, name in threads["parse"] if op == "run"]
    assert [elements for elements, _ in runs] == [0, 600 * 14 * 64, 600 * 14 * 64], runs
    assert not runs[0][1].startswith("interplab-model"), runs  # no tensors: read in the event loop
    assert runs[1][1] == runs[2][1] == threads["build"], runs  # read and checked in the model's thread


def test_a_served_config_reads_its_fields_and_aliases_without_the_config_class():
    from transformers import GPT2Config

    from interplab.serve import ServedConfig

    local = GPT2Config(n_embd=48, n_head=4, n_layer=3, n_positions=64)
    served = ServedConfig("gpt2", json.loads(json.dumps(local.to_dict())), local.attribute_map)
    assert (served.hidden_size, served.num_attention_heads, served.num_hidden_layers) == (48, 4, 3)
    assert served.max_position_embeddings == 64 and served.model_type == "gpt2"
    assert served.to_transformers().to_dict() == local.to_dict()
    with pytest.raises(AttributeError, match="no field 'not_a_field'"):
        served.not_a_field  # noqa: B018 - the attribute read is the test


def test_a_second_connection_reuses_the_served_tokenizer(inproc, monkeypatch):
    first = inproc.model()
    built = first.tokenizer
    sha = first.info["tokenizer_sha"]
    assert isinstance(sha, str) and len(sha) == 64
    second = inproc.model()
    asked: list[str] = []
    real_call = type(second)._call

    def spy(self, op, header, frame=None):
        asked.append(op)
        return real_call(self, op, header, frame)

    monkeypatch.setattr(type(second), "_call", spy)
    assert second.tokenizer is built and "tokenizer" not in asked
    assert second.tokenizer(" Mary")["input_ids"] == first.tokenizer(" Mary")["input_ids"]
