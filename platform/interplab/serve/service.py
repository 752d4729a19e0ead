"""The operations of a served model, independent of Ray Serve: read a request, check it against the
model and the limits, run it on the backend, build the answer.

    service = ModelService(backend, name="tiny-llama", limits=ServeLimits(), dtype="float32")
    call = service.parse("run", header, tensors, user="alice")    # user errors raised here
    answer = service.execute(call)                                 # (JSON, Frame) on the model's thread

``run`` calls are batched across requests by the deployment (:mod:`interplab.serve.batching`);
everything else runs one request at a time on the same thread. See ``docs/serving.md`` for each
operation's fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from interplab.engine.backend import Backend
from interplab.engine.results import GradResult, RunResult, StageRequest
from interplab.engine.tokens import TokenBatch, pad_id
from interplab.serve import codec
from interplab.serve.batching import RunCall, check_alone
from interplab.serve.errors import FieldError, LimitError, UnknownModelError
from interplab.serve.limits import ServeLimits, positions_count, run_bytes
from interplab.serve.metrics import WIRE_METRICS, TokenMetric
from interplab.serve.wire import FLOATS, Frame, Reader

OPERATIONS = ("info", "tokenize", "tokenizer", "run", "gradients", "generate", "run_stages", "stage_forward")


@dataclass
class Call:
    """A checked request of any operation but ``run``: ``op`` and its decoded arguments."""

    op: str
    user: str
    args: dict[str, Any] = field(default_factory=dict)


class ModelService:
    """One served model's operations (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        limits: ServeLimits,
        dtype: str = "float32",
        source: str = "",
        parallel: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.limits = limits
        self.dtype = getattr(torch, dtype)
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.source = source or backend.name
        self.parallel = dict(parallel or {})
        m = backend
        self.dims = {"n_heads": m.n_heads, "d_model": m.d_model, "d_head": m.head_dim, "d_mlp": m.d_mlp, "vocab": m.d_vocab}
        self.pad_id = pad_id(m.tokenizer)

    # ------------------------------------------------------------------ reading requests
    def parse(self, op: str, header: dict[str, Any], tensors: Mapping[str, torch.Tensor], user: str) -> Call | RunCall:
        if op not in OPERATIONS:
            raise FieldError("op", f"unknown operation {op!r}; the service offers {', '.join(OPERATIONS)}")
        reader = Reader(header, "", tensors)
        model = reader.raw("model")
        if model != self.name:
            raise UnknownModelError(f"model: this endpoint serves {self.name!r}, the request names {model!r}")
        parse: Callable[[Reader, str], Call | RunCall] = getattr(self, f"_parse_{op}")
        return parse(reader, user)

    def _parse_info(self, r: Reader, user: str) -> Call:
        r.only(["model"])
        return Call("info", user)

    def _parse_tokenizer(self, r: Reader, user: str) -> Call:
        r.only(["model"])
        return Call("tokenizer", user)

    def _parse_tokenize(self, r: Reader, user: str) -> Call:
        r.only(["model", "prompts", "strings"])
        batch = codec.decode_prompts(r.child("prompts"), self.backend)
        self.limits.check_batch(batch)
        return Call("tokenize", user, {"batch": batch, "strings": r.flag("strings")})

    def _parse_run(self, r: Reader, user: str) -> RunCall:
        r.only(["model", "prompts", "capture", "interventions", "positions", "logits", "keep_kv"])
        batch = codec.decode_prompts(r.child("prompts"), self.backend)
        self.limits.check_batch(batch)
        call = RunCall(
            batch,
            codec.decode_sites(r, "capture", self.backend),
            codec.decode_interventions(r, "interventions", self.backend),
            codec.decode_positions(r),
            r.text("logits", "all", choices=codec.LOGITS),
            r.flag("keep_kv"),
            user,
        )
        self._check_rows(call.positions, batch, r.field("positions"))
        check_alone(call, self.dims)
        nbytes = run_bytes(
            call.capture, batch, positions_count(call.positions, batch.seq_len), call.logits, self.dims, self.itemsize
        )
        if call.keep_kv:
            nbytes += (
                2
                * self.backend.n_layers
                * batch.size
                * self.backend.n_kv_heads
                * batch.seq_len
                * self.backend.head_dim
                * self.itemsize
            )
        self.limits.check_response(nbytes)
        return call

    def _parse_gradients(self, r: Reader, user: str) -> Call:
        r.only(["model", "prompts", "metric", "sites", "interventions", "capture", "positions", "logits"])
        batch = codec.decode_prompts(r.child("prompts"), self.backend)
        self.limits.check_batch(batch)
        metric = self._metric(r.child("metric"), batch)
        sites = codec.decode_sites(r, "sites", self.backend)
        if not sites:
            raise FieldError("sites", "name at least one site to differentiate")
        run = RunCall(
            batch,
            codec.decode_sites(r, "capture", self.backend),
            codec.decode_interventions(r, "interventions", self.backend),
            codec.decode_positions(r),
            r.text("logits", "all", choices=("all", "last")),
        )
        self._check_rows(run.positions, batch, r.field("positions"))
        check_alone(run, self.dims)
        p = positions_count(run.positions, batch.seq_len)
        self.limits.check_response(run_bytes([*run.capture, *sites], batch, p, run.logits, self.dims, self.itemsize))
        return Call("gradients", user, {"run": run, "metric": metric, "sites": sites})

    def _metric(self, r: Reader, batch: TokenBatch) -> TokenMetric:
        r.only(["name", "answer", "wrong", "reduce"])
        name = r.text("name", choices=WIRE_METRICS)

        def ids(key: str) -> int | list[int] | None:
            value = r.raw(key, None)
            if value is None:
                return None
            items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise FieldError(r.field(key), "must be a token id or a list of token ids")
            if any(not 0 <= v < self.backend.d_vocab for v in items) or len(items) not in (1, batch.size):
                raise FieldError(r.field(key), f"needs 1 or {batch.size} token ids in [0, {self.backend.d_vocab})")
            return items if isinstance(value, list) else items[0]

        answer = ids("answer")
        if answer is None:
            raise FieldError(r.field("answer"), "is required")
        try:
            return TokenMetric(name, answer, ids("wrong"), r.text("reduce", "mean", choices=("mean", "sum")))
        except ValueError as exc:
            raise FieldError(r.path, str(exc)) from None

    def _parse_generate(self, r: Reader, user: str) -> Call:
        r.only(["model", "prompt", "max_new_tokens", "interventions"])
        prompt = r.text("prompt")
        steps = r.integer("max_new_tokens", 10, minimum=0)
        if steps > self.limits.max_new_tokens:
            raise LimitError("max_new_tokens", self.limits.max_new_tokens, steps, "the request's max_new_tokens")
        batch = self.backend.tokenize(prompt)
        interventions = codec.decode_interventions(r, "interventions", self.backend)
        check_alone(RunCall(batch, [], interventions, None, "last"), self.dims)
        longest = batch.seq_len + max(steps - 1, 0)  # the last step's one row
        if longest > self.limits.max_tokens:
            raise LimitError("max_tokens", self.limits.max_tokens, longest, "the generated sequence's length")
        return Call("generate", user, {"prompt": prompt, "steps": steps, "interventions": interventions})

    def _parse_run_stages(self, r: Reader, user: str) -> Call:
        r.only(["model", "requests"])
        items = r.raw("requests")
        if not isinstance(items, list):
            raise FieldError("requests", "must be a list of stage requests")
        if len(items) > self.limits.max_stage_requests:
            raise LimitError("max_stage_requests", self.limits.max_stage_requests, len(items), "the number of passes")
        requests = []
        nbytes = 0
        for i, item in enumerate(items):
            key, req = codec.decode_stage_request(r.child(f"requests[{i}]", item), self.backend)
            self._check_stage_tensors(req, f"requests[{i}]")
            self.limits.check_batch(req.batch, f"requests[{i}]")
            check_alone(RunCall(req.batch, [], list(req.interventions), None, req.logits), self.dims)
            nbytes += self._output_bytes(req.batch, req.with_head, req.logits, req.vocab)
            requests.append((key, req))
        self.limits.check_response(nbytes)
        return Call("run_stages", user, {"requests": requests})

    def _parse_stage_forward(self, r: Reader, user: str) -> Call:
        r.only(["model", "index", "batch", "hidden", "start", "capture", "interventions", "logits"])
        batch = codec.decode_prompts(r.child("batch"), self.backend)
        self.limits.check_batch(batch)
        hidden = r.tensor("hidden", dtypes=FLOATS, ndim=3, default=None)
        if hidden is not None and (
            tuple(hidden.shape) != (batch.size, batch.seq_len, self.backend.d_model) or hidden.dtype != self.dtype
        ):
            raise FieldError(
                "hidden",
                f"is {str(hidden.dtype).removeprefix('torch.')} {list(hidden.shape)}; expected "
                f"{str(self.dtype).removeprefix('torch.')} {[batch.size, batch.seq_len, self.backend.d_model]}",
            )
        capture = codec.decode_sites(r, "capture", self.backend)
        interventions = codec.decode_interventions(r, "interventions", self.backend)
        logits = r.text("logits", "last", choices=codec.STAGE_LOGITS)
        check_alone(RunCall(batch, capture, interventions, None, logits), self.dims)
        p = batch.seq_len
        self.limits.check_response(
            run_bytes(capture, batch, p, logits, self.dims, self.itemsize) + batch.size * p * self.backend.d_model * self.itemsize
        )
        return Call(
            "stage_forward",
            user,
            {
                "index": r.integer("index", minimum=0),
                "batch": batch,
                "hidden": hidden,
                "start": r.integer("start", None, minimum=0),
                "capture": capture,
                "interventions": interventions,
                "logits": logits,
            },
        )

    def _check_rows(self, positions: object, batch: TokenBatch, field: str) -> None:
        if isinstance(positions, torch.Tensor) and positions.shape[0] != batch.size:
            raise FieldError(field, f"has {positions.shape[0]} rows for a batch of {batch.size}")

    def _check_stage_tensors(self, req: StageRequest, field: str) -> None:
        named = [
            ("hidden", req.hidden),
            *((f"joins.{k}", v) for k, v in (req.joins or {}).items() if isinstance(v, torch.Tensor)),
        ]
        named += [(f"prefix.kv.{k}", t) for k, kv in (req.prefix.kv.items() if req.prefix else ()) for t in kv]
        for name, tensor in named:
            if tensor is not None and tensor.dtype != self.dtype:
                raise FieldError(
                    f"{field}.{name}",
                    f"has dtype {str(tensor.dtype).removeprefix('torch.')}; the model runs in "
                    f"{str(self.dtype).removeprefix('torch.')}",
                )

    def _output_bytes(self, batch: TokenBatch, with_head: bool, logits: str, vocab: torch.Tensor | None) -> int:
        width = (len(vocab) if vocab is not None else self.backend.d_vocab) if with_head else self.backend.d_model
        positions = batch.seq_len if (logits == "all" or not with_head) else 1
        return batch.size * positions * width * self.itemsize

    # ------------------------------------------------------------------ running (the model's thread)
    def execute(self, call: Call) -> tuple[dict[str, Any], Frame]:
        run: Callable[[Call, Frame], dict[str, Any]] = getattr(self, f"_execute_{call.op}")
        frame = Frame(find_repeats=False)  # an answer
        return run(call, frame), frame

    def info(self) -> dict[str, Any]:
        m = self.backend
        config = m.config.to_dict() if hasattr(m.config, "to_dict") else {}
        return {
            "name": self.name,
            "model": m.name,
            "source": self.source,
            "weight_hash": m.weight_hash,
            "model_type": getattr(m.config, "model_type", None),
            "config": _jsonable(config),
            "config_aliases": {str(k): str(v) for k, v in getattr(m.config, "attribute_map", {}).items()},
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(m.device) if hasattr(m, "device") else None,  # a pipeline: its stages' own
            "sizes": {
                "n_layers": m.n_layers,
                "n_heads": m.n_heads,
                "n_kv_heads": m.n_kv_heads,
                "d_model": m.d_model,
                "head_dim": m.head_dim,
                "d_mlp": m.d_mlp,
                "d_vocab": m.d_vocab,
                "has_resid_mid": m.has_resid_mid,
            },
            "stage_ranges": [list(r) for r in m.stage_ranges],
            "parallel": self.parallel,
            "sites": [str(s) for s in m.sites()],
            "tokenizer": getattr(m.tokenizer, "name_or_path", "") or "",
            "tokenizer_sha": self._tokenizer_answer[1] if self._tokenizer_answer is not None else None,
            "limits": self.limits.model_dump(),
        }

    def _execute_info(self, call: Call, frame: Frame) -> dict[str, Any]:
        return {**self.info(), "user": call.user}

    @cached_property
    def _tokenizer_answer(self) -> tuple[dict[str, Any], str] | None:
        """The served (fast) tokenizer as JSON, and its SHA-256 (clients keep built copies by it);
        None for a tokenizer that is not a fast one."""
        answer = tokenizer_payload(self.backend.tokenizer)
        if answer is None:
            return None
        return answer, hashlib.sha256(json.dumps(answer, sort_keys=True).encode()).hexdigest()

    def _execute_tokenizer(self, call: Call, frame: Frame) -> dict[str, Any]:
        if self._tokenizer_answer is None:
            raise NotImplementedError("this model's tokenizer is not a fast (tokenizers) one; use tokenize() on the service")
        return {**self._tokenizer_answer[0], "sha": self._tokenizer_answer[1]}

    def _execute_tokenize(self, call: Call, frame: Frame) -> dict[str, Any]:
        batch: TokenBatch = call.args["batch"]
        out: dict[str, Any] = {"batch": codec.encode_batch(batch, frame)}
        if call.args["strings"]:
            tok = self.backend.tokenizer
            out["strings"] = [
                [tok.decode([int(t)]) for t in batch.input_ids[i, : int(batch.lengths[i])]] for i in range(batch.size)
            ]
        return out

    def _execute_gradients(self, call: Call, frame: Frame) -> dict[str, Any]:
        run: RunCall = call.args["run"]
        result: GradResult = self.backend.gradients(
            run.batch,
            call.args["metric"],
            call.args["sites"],
            interventions=run.interventions,
            capture=run.capture,
            positions=run.positions,
            logits=run.logits,
        )
        return {
            "value": frame.ref(result.value),
            "grads": codec.encode_cache(result.grads, frame),
            "cache": codec.encode_cache(result.cache, frame),
            "logits": frame.ref(result.logits),
        }

    def _execute_generate(self, call: Call, frame: Frame) -> dict[str, Any]:
        return {"text": self.backend.generate(call.args["prompt"], call.args["steps"], interventions=call.args["interventions"])}

    def _execute_run_stages(self, call: Call, frame: Frame) -> dict[str, Any]:
        outputs: list[dict[str, Any]] = []
        self.backend.run_stages(
            iter(call.args["requests"]), lambda key, out: outputs.append({"key": key, "output": frame.ref(out)})
        )
        return {"outputs": outputs}

    def _execute_stage_forward(self, call: Call, frame: Frame) -> dict[str, Any]:
        a = call.args
        out, cache = self.backend.stage_forward(
            a["index"],
            a["batch"],
            a["hidden"],
            start=a["start"],
            capture=a["capture"],
            interventions=a["interventions"],
            logits=a["logits"],
        )
        return {"output": frame.ref(out), "cache": codec.encode_cache(cache, frame)}

    def encode_run(self, call: RunCall, result: RunResult, texts_sent: bool) -> tuple[dict[str, Any], Frame]:
        """A ``run`` answer; the batch goes back when the service tokenised the prompts."""
        frame = Frame(find_repeats=False)  # an answer
        out: dict[str, Any] = {"logits": frame.maybe(result.logits), "cache": codec.encode_cache(result.cache, frame)}
        if texts_sent:
            out["batch"] = codec.encode_batch(result.batch, frame)
        if result.kv is not None:
            out["kv"] = {str(layer): [frame.ref(k), frame.ref(v)] for layer, (k, v) in result.kv.items()}
        return out, frame


def tokenizer_payload(tok: Any) -> dict[str, Any] | None:
    """A fast tokenizer as the service sends it (:class:`~interplab.serve.tokenizer.ServedTokenizer`
    rebuilds it): its backend's JSON, as transformers left it, and its special tokens; None for a
    tokenizer that is not a fast one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return {"tokenizer_json": backend.to_str(), "special_tokens": special, "name_or_path": getattr(tok, "name_or_path", "")}


def _jsonable(value: Any) -> Any:
    """A config dict with only JSON values (dtypes and other objects as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return str(value)
