"""Shared pieces of the service tests: tokens, prompts, and an in-process transport.

:class:`InProcess` speaks to a :class:`~interplab.serve.server.Server` in this process exactly as a
:class:`~interplab.serve.client.Session` speaks to Serve's HTTP proxy (the same frames and error
answers), so the wire, the checks and the batching are tested without Ray; the Serve tests run the
same client over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from interplab.serve.errors import from_body
from interplab.serve.wire import Frame, decode_frame

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef01"
MODEL = "tiny-llama"
CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Alice went to the park, Alice gave a ball to",
]
CORRUPT = [
    "When Mary and John went to the store, Mary gave a drink to",
    "When Tom and Alice went to the park, Tom gave a ball to",
]
PROMPTS = [*CLEAN, "The city of Paris is in"]  # unequal lengths: padded rows
ANSWER, WRONG = 5, 9
TOL = dict(rtol=1e-6, atol=1e-6)  # remote vs local: the same code on the same weights
BATCH_TOL = dict(rtol=1e-5, atol=1e-5)  # merged vs alone: another batch shape rounds differently


def wait_for(condition, what: str, timeout_s: float = 120.0, poll_s: float = 0.005) -> None:
    """Bounded wait for ``condition()`` to hold (polled; fails the test naming ``what`` after the timeout)."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens.txt"
    path.write_text(f"# test tokens\n{ALICE} alice\n{BOB} bob\n")
    return path


class InProcess:
    """A session's transport to a Server in this process (its queue runs on a loop thread)."""

    url = "in-process"

    def __init__(self, server, token: str = ALICE) -> None:
        self.server = server
        self.token = token
        self.loop = asyncio.new_event_loop()  # one loop per server, as a replica has
        self.thread: threading.Thread | None = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def as_user(self, token: str) -> InProcess:
        """A transport to the same server (and loop) with another token."""
        other = object.__new__(InProcess)
        other.server, other.token, other.loop, other.thread = self.server, token, self.loop, None
        return other

    def raw(self, op: str, body: bytes, authorization: str | None = None):
        auth = authorization if authorization is not None else f"Bearer {self.token}"
        future = asyncio.run_coroutine_threadsafe(self.server.answer(op, auth, body), self.loop)
        return future.result(timeout=120)

    def call(self, name, op, header, frame=None):
        answer = self.raw(op, (frame or Frame()).encode({**header, "model": name}))
        if answer.status == 200:
            return decode_frame(answer.body, max_json_bytes=1 << 40, max_tensor_bytes=1 << 40)
        raise from_body(answer.status, json.loads(answer.body))

    def model(self, name: str = MODEL):
        from interplab.serve.remote import RemoteModel

        return RemoteModel(self, name)

    def close(self) -> None:
        if self.thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.batcher.aclose(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- malformed requests
def _frame(header: dict, tensors: dict | None = None) -> bytes:
    from interplab.serve.wire import encode_frame

    return encode_frame(header, tensors or {})


def _t(name: str) -> dict:
    return {"$tensor": name}


def _stage_with_prefix(name: str, ok: dict, keys, rows=None) -> bytes:
    """A ``run_stages`` request from layer 1 whose first position comes from a prefix (keys = values)."""
    import torch

    prefix = {"length": 1, "kv": {"1": [_t("k"), _t("k")], "2": [_t("k"), _t("k")]}, "rows": _t("r") if rows is not None else None}
    tensors = {"k": keys, "h": torch.zeros(1, 2, 64), **({"r": rows} if rows is not None else {})}
    request = {"key": 0, "batch": ok["prompts"], "start": 1, "stop": 3, "hidden": _t("h"), "prefix": prefix}
    return _frame({"model": name, "requests": [request]}, tensors)


def malformed_requests(name: str = MODEL) -> list[tuple[str, str, bytes, int, str]]:
    """``(case, op, body, status, text the error names)`` for requests a service must refuse."""
    import struct

    import torch

    from interplab.serve.wire import MAGIC

    ok = {"model": name, "prompts": {"texts": ["Mary lives in"]}}
    ids = {"input_ids": _t("ids"), "lengths": _t("len")}
    one = torch.tensor([[3, 4, 5]])
    three = torch.tensor([3])

    def run(**fields) -> bytes:
        tensors = fields.pop("_tensors", None)
        return _frame({**ok, **fields}, tensors)

    def patch(**fields) -> bytes:
        tensors = fields.pop("_tensors", {"v": torch.ones(64)})
        item = {"site": "resid_pre.1", "op": "set", "value": _t("v"), **fields}
        return _frame({**ok, "interventions": [item]}, tensors)

    def raw(text: bytes) -> bytes:
        return MAGIC + struct.pack("<I", len(text)) + text

    return [
        ("empty body", "run", b"", 400, "body"),
        ("wrong magic", "run", b"GIF89a" + b"\0" * 20, 400, "magic"),
        ("json length past the end", "run", MAGIC + struct.pack("<I", 1000) + b"{}", 400, "only 2 follow"),
        ("json does not parse", "run", raw(b"{nope"), 400, "does not parse"),
        ("json is a list", "run", raw(b"[]"), 400, "must be an object"),
        ("json nested too deep", "run", raw(b"[" * 200_000), 400, "body"),
        ("json NaN", "run", raw(b'{"x": NaN}'), 400, "NaN"),
        ("safetensors garbage", "run", _frame(ok) + b"\x05\0\0\0\0\0\0\0garbage", 400, "safetensors"),
        ("no model", "run", _frame({"prompts": ok["prompts"]}), 400, "model"),
        ("another model", "run", run(model="gpt-17"), 400, "model"),
        ("unknown operation", "explode", _frame(ok), 400, "unknown operation"),
        ("unknown field", "run", run(capturee=["resid_pre.1"]), 400, "capturee"),
        ("no prompts", "run", _frame({"model": name}), 400, "prompts"),
        ("texts not strings", "run", run(prompts={"texts": [1, 2]}), 400, "prompts.texts"),
        ("no texts", "run", run(prompts={"texts": []}), 400, "no prompts"),
        ("unknown site kind", "run", run(capture=["resid_preee.1"]), 400, "capture[0]"),
        ("layer out of range", "run", run(capture=["resid_pre.99"]), 400, "layer 99 out of range"),
        ("site not a string", "run", run(capture=[5]), 400, "capture"),
        ("op apply", "run", patch(op="apply"), 400, "interventions[0].op"),
        ("value NaN", "run", patch(_tensors={"v": torch.full((64,), float("nan"))}), 400, "interventions[0].value"),
        ("value int dtype", "run", patch(_tensors={"v": torch.ones(64, dtype=torch.int64)}), 400, "dtype"),
        ("value wrong shape", "run", patch(_tensors={"v": torch.ones(7)}), 400, "does not fit"),
        ("rows out of range", "run", patch(rows=[3]), 400, "out of range"),
        ("missing tensor", "run", patch(_tensors={}), 400, "does not hold"),
        ("heads on a stream site", "run", patch(heads=[0]), 400, "not a per-head site"),
        ("positions out of range", "run", run(positions=[40]), 400, "out of range"),
        ("logits mode", "run", run(logits="some"), 400, "logits"),
        ("keep_kv not a bool", "run", run(keep_kv="yes"), 400, "keep_kv"),
        ("input ids float", "run", run(prompts=ids, _tensors={"ids": one.float(), "len": three}), 400, "prompts.input_ids"),
        ("input ids out of vocabulary", "run", run(prompts=ids, _tensors={"ids": one + 10**6, "len": three}), 400, "vocabulary"),
        ("lengths do not match", "run", run(prompts=ids, _tensors={"ids": one, "len": torch.tensor([3, 3])}), 400, "prompts.lengths"),
        ("metric unknown", "gradients", _frame({**ok, "metric": {"name": "vibes", "answer": 1}, "sites": ["resid_pre.1"]}), 400, "metric.name"),
        ("metric no sites", "gradients", _frame({**ok, "metric": {"name": "logprob", "answer": 1}, "sites": []}), 400, "sites"),
        ("generate negative", "generate", _frame({"model": name, "prompt": "Mary", "max_new_tokens": -1}), 400, "max_new_tokens"),
        ("stages past the end", "run_stages",
         _frame({"model": name, "requests": [{"key": 0, "batch": ok["prompts"], "start": 0, "stop": 9}]}), 400, "requests[0].stop"),
        ("hidden wrong shape", "stage_forward",
         _frame({"model": name, "index": 0, "batch": ok["prompts"], "hidden": _t("h")}, {"h": torch.ones(1, 3, 7)}), 400, "hidden"),
        ("prefix rows out of range", "run_stages", _stage_with_prefix(name, ok, torch.ones(1, 2, 1, 16), rows=torch.tensor([3])),
         400, "prefix.rows"),
        ("prefix rows not one per row", "run_stages", _stage_with_prefix(name, ok, torch.ones(1, 2, 1, 16), rows=torch.tensor([0, 0])),
         400, "prefix.rows"),
        ("prefix keys wrong shape", "run_stages", _stage_with_prefix(name, ok, torch.ones(1, 3, 1, 16)), 400, "prefix.kv.1"),
        ("hidden infinite", "stage_forward",
         _frame({"model": name, "index": 0, "batch": ok["prompts"], "hidden": _t("h")}, {"h": torch.full((1, 3, 64), float("inf"))}),
         400, "infinite"),
    ]
