"""``RemoteModel``: a served model as a :class:`~interplab.engine.backend.Backend`.

    model = connect(url, token=token).model("tiny-llama")
    out = model.run(prompts, capture=["z.1"], interventions=[patch(...)], logits="last")
    grads = model.gradients(prompts, TokenMetric("logit_diff", answer=5, wrong=9), ["resid_pre.1"])

Shapes, config and sites come from the service's ``info`` once; every forward pass is one request.
Tokenisation is the service's (``tokenize`` asks it; ``run`` on texts sends the texts), so positions
always count the served tokenizer's tokens; ``tokenizer`` is a local copy rebuilt from the served
tokenizer's JSON, for ``tokenizer(" Mary")`` and ``decode``. What a shared model cannot do is refused
with a clear error: training and writing weights (a served model is read-only), Python callables
(``apply`` interventions, metric functions), ``run(grad=True)``. Weights are not served
(``parameter_names``/``get_parameters`` raise ``NotImplementedError``): a 70B model's weights are what
the service exists to keep in one place.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import torch

from interplab.engine import stream
from interplab.engine.backend import CaptureSink
from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention
from interplab.engine.plan import Positions
from interplab.engine.results import GradResult, LogitsMode, Metric, Prompts, RunResult, StageRequest
from interplab.engine.sites import Site, SiteError, SiteKind
from interplab.engine.stream import CaptureChunk
from interplab.engine.tokens import TokenBatch
from interplab.engine.training import AdamConfig, Trainer
from interplab.serve import codec
from interplab.serve.metrics import check_wire_metric
from interplab.serve.wire import Frame

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.engine.hooked import HookedModel
    from interplab.models.arch.base import ArchSpec
    from interplab.serve.client import Session

Key = TypeVar("Key")
_TOKENIZERS: dict[str, Any] = {}  # served tokenizers built in this process, by the SHA-256 of their JSON


class ReadOnlyModelError(RuntimeError):
    """Training or writing weights on a served model (shared by every user: read-only)."""


class ServedConfig:
    """A served model's config: the fields of the transformers config the service loaded (its
    ``to_dict()``) as read-only attributes, under the same aliases (``attribute_map``, e.g. GPT-2's
    ``hidden_size`` for ``n_embd``). Reading fields needs no transformers import (importing a model
    family's config class costs seconds at every client start); :meth:`to_transformers` builds the
    transformers config itself."""

    def __init__(self, model_type: str, values: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
        self._values = {**values, "model_type": values.get("model_type") or model_type}
        if isinstance(self._values.get("id2label"), dict):  # JSON object keys are strings; the ids are ints
            self._values["id2label"] = {int(k): v for k, v in self._values["id2label"].items()}
        self._aliases = dict(aliases)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        key = self.__dict__.get("_aliases", {}).get(name, name)
        if key in values:
            return values[key]
        raise AttributeError(f"the served config has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def to_transformers(self) -> Any:
        from transformers import AutoConfig

        values = self.to_dict()
        return AutoConfig.for_model(values.pop("model_type"), **values)

    def __repr__(self) -> str:
        return f"ServedConfig({self._values['model_type']!r}, {len(self._values)} fields)"


class RemoteModel:
    """A model served by ``interplab serve``, behind the engine's backend protocol. See the module docstring."""

    def __init__(self, session: Session, name: str) -> None:
        self.session = session
        self.served_name = name
        self.info = self._call("info", {})[0]
        sizes = self.info["sizes"]
        self.n_layers: int = sizes["n_layers"]
        self.n_heads: int = sizes["n_heads"]
        self.n_kv_heads: int = sizes["n_kv_heads"]
        self.d_model: int = sizes["d_model"]
        self.head_dim: int = sizes["head_dim"]
        self.d_mlp: int = sizes["d_mlp"]
        self.d_vocab: int = sizes["d_vocab"]
        self.has_resid_mid: bool = sizes["has_resid_mid"]
        self._sites = [Site.parse(s) for s in self.info["sites"]]
        self._site_set = set(self._sites)

    def _call(
        self, op: str, header: dict[str, Any], frame: Frame | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.session.call(self.served_name, op, header, frame)

    # ------------------------------------------------------------------ shape and config
    @property
    def name(self) -> str:
        return str(self.info["model"])

    @property
    def weight_hash(self) -> str:
        return str(self.info["weight_hash"])

    @property
    def user(self) -> str:
        """The user name the service knows this session's token by."""
        return str(self.info["user"])

    @cached_property
    def config(self) -> ServedConfig:
        """The served model's config fields (``ServedConfig.to_transformers()`` for the transformers object)."""
        return ServedConfig(self.info["model_type"], self.info["config"], self.info.get("config_aliases", {}))

    @cached_property
    def spec(self) -> ArchSpec:
        from interplab.models.arch import arch_for_model_type

        return arch_for_model_type(self.info["model_type"])

    @cached_property
    def tokenizer(self) -> Any:
        """A local copy of the served (fast) tokenizer, rebuilt from its JSON (no code is loaded): a
        :class:`~interplab.serve.tokenizer.ServedTokenizer` (encodes and decodes without importing
        transformers; ``.full`` is the transformers tokenizer); one per process for each served
        tokenizer (by its SHA-256), however many connections use it."""
        from interplab.serve.tokenizer import ServedTokenizer

        sha = self.info.get("tokenizer_sha")
        if sha is not None and sha in _TOKENIZERS:
            return _TOKENIZERS[sha]
        out, _ = self._call("tokenizer", {})
        tokenizer = ServedTokenizer(out["tokenizer_json"], out["special_tokens"], out.get("name_or_path", ""))
        if out.get("sha"):
            _TOKENIZERS[str(out["sha"])] = tokenizer
        return tokenizer

    @property
    def stage_ranges(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.info["stage_ranges"]]

    def stage_of(self, site: Site | str) -> int:
        site = self.validate_site(site)
        ranges = self.stage_ranges
        if site.layer is None:
            return 0 if site.kind == SiteKind.EMBED else len(ranges) - 1
        return next(i for i, (start, stop) in enumerate(ranges) if start <= site.layer < stop)

    @property
    def local_model(self) -> HookedModel | None:
        """None: the weights live in the service."""
        return None

    # ------------------------------------------------------------------ tokens and sites
    def tokenize(self, prompts: Prompts) -> TokenBatch:
        if isinstance(prompts, TokenBatch):
            return prompts
        frame = Frame()
        out, tensors = self._call("tokenize", {"prompts": codec.encode_prompts(prompts, frame)}, frame)
        return codec.decode_batch(out["batch"], tensors)

    def to_str_tokens(self, text: str) -> list[str]:
        frame = Frame()
        out, _ = self._call("tokenize", {"prompts": codec.encode_prompts(text, frame), "strings": True}, frame)
        return list(out["strings"][0])

    def sites(self, kinds: Iterable[str] | None = None) -> list[Site]:
        if kinds is None:
            return list(self._sites)
        wanted = {SiteKind(k) for k in kinds}
        return [s for s in self._sites if s.kind in wanted]

    def validate_site(self, site: Site | str) -> Site:
        site = Site.parse(site)
        if site.layer is not None and site.layer >= self.n_layers:
            raise SiteError(f"site {site}: layer {site.layer} out of range; {self.name} has layers 0..{self.n_layers - 1}")
        if site.head is not None and site.head >= self.n_heads:
            raise SiteError(f"site {site}: head {site.head} out of range; the model has heads 0..{self.n_heads - 1}")
        if site.all_heads() not in self._site_set:
            raise SiteError(
                f"site {site}: the {self.info['model_type']} family has no {site.kind.value} sites "
                f"(the served model's sites: info['sites'])"
            )
        return site

    # ------------------------------------------------------------------ forward and backward
    def run(
        self,
        prompts: Prompts,
        *,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        grad: bool = False,
        keep_kv: bool = False,
    ) -> RunResult:
        """As :meth:`HookedModel.run`, on the service (``grad=True`` is refused: the graph would live there)."""
        if grad:
            raise ValueError(
                "RemoteModel.run(grad=True) is not supported: the autograd graph would live in the service; "
                "use gradients(...) with a TokenMetric"
            )
        frame = Frame()
        header = {
            "prompts": codec.encode_prompts(prompts, frame),
            "capture": [str(Site.parse(s)) for s in capture],
            "interventions": codec.encode_interventions(interventions, frame),
            "positions": codec.encode_positions(positions, frame),
            "logits": logits,
            "keep_kv": keep_kv,
        }
        out, tensors = self._call("run", header, frame)
        batch = prompts if isinstance(prompts, TokenBatch) else codec.decode_batch(out["batch"], tensors)
        kv = None
        if out.get("kv") is not None:
            kv = {
                int(layer): (codec.answer_tensor(k, "kv", tensors), codec.answer_tensor(v, "kv", tensors))
                for layer, (k, v) in out["kv"].items()
            }
        return RunResult(
            codec.tensor_or_none(out["logits"], "logits", tensors), codec.decode_cache(out["cache"], tensors), batch, kv
        )

    def gradients(
        self,
        prompts: Prompts,
        metric: Metric,
        sites: Sequence[Site | str],
        *,
        interventions: Sequence[Intervention] = (),
        capture: Sequence[Site | str] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
    ) -> GradResult:
        """As :meth:`HookedModel.gradients`; ``metric`` must be a :class:`~interplab.serve.TokenMetric`."""
        declared = check_wire_metric(metric)
        frame = Frame()
        header = {
            "prompts": codec.encode_prompts(prompts, frame),
            "metric": declared.to_json(),
            "sites": [str(Site.parse(s)) for s in sites],
            "capture": [str(Site.parse(s)) for s in capture],
            "interventions": codec.encode_interventions(interventions, frame),
            "positions": codec.encode_positions(positions, frame),
            "logits": logits,
        }
        out, tensors = self._call("gradients", header, frame)
        return GradResult(
            codec.answer_tensor(out["value"], "value", tensors),
            codec.decode_cache(out["grads"], tensors),
            codec.decode_cache(out["cache"], tensors),
            codec.answer_tensor(out["logits"], "logits", tensors),
        )

    def generate(self, prompt: str, max_new_tokens: int = 10, *, interventions: Sequence[Intervention] = ()) -> str:
        frame = Frame()
        header = {
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "interventions": codec.encode_interventions(interventions, frame),
        }
        return str(self._call("generate", header, frame)[0]["text"])

    def run_stages(self, requests: Iterable[tuple[Key, StageRequest]], on_done: Callable[[Key, torch.Tensor], None]) -> None:
        """Many mid-model passes, sent ``max_stage_requests`` at a time and within the service's
        request-size limits (tensors shared by passes, like a KV prefix, go once per call); the
        iterable is read lazily. A single pass over the limits is sent alone (and refused with 413)."""
        limits = self.info["limits"]
        per_call = int(limits["max_stage_requests"])
        body_budget, tensor_budget = int(limits["max_request_bytes"] * 0.9), int(limits["max_tensor_bytes"] * 0.9)
        pending = iter(requests)
        carried: list[tuple[Key, StageRequest]] = []
        while True:
            part = carried + list(itertools.islice(pending, per_call - len(carried)))
            if not part:
                return
            frame = Frame()
            encoded: list[dict[str, Any]] = []
            for i, (_, req) in enumerate(part):
                before = len(frame.tensors)
                item = codec.encode_stage_request(i, req, frame)
                over = frame.nbytes > body_budget or frame.whole_nbytes > tensor_budget
                if encoded and over:  # over the budget: this pass goes in the next call
                    frame.forget_after(before)
                    break
                encoded.append(item)
            carried = part[len(encoded) :]
            out, tensors = self._call("run_stages", {"requests": encoded}, frame)
            for item in out["outputs"]:
                on_done(part[int(item["key"])][0], codec.answer_tensor(item["output"], "output", tensors))

    def stage_forward(
        self,
        index: int,
        batch: TokenBatch,
        hidden: torch.Tensor | None,
        *,
        start: int | None = None,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        logits: LogitsMode = "last",
    ) -> tuple[torch.Tensor, ActivationCache]:
        frame = Frame()
        header = {
            "index": index,
            "batch": codec.encode_prompts(batch, frame),
            "hidden": frame.maybe(hidden),
            "start": start,
            "capture": [str(Site.parse(s)) for s in capture],
            "interventions": codec.encode_interventions(interventions, frame),
            "logits": logits,
        }
        out, tensors = self._call("stage_forward", header, frame)
        return codec.answer_tensor(out["output"], "output", tensors), codec.decode_cache(out["cache"], tensors)

    def capture(
        self,
        prompts: Sequence[str],
        sites: Sequence[Site | str],
        sink: CaptureSink,
        *,
        batch_size: int = 16,
        positions: Positions = None,
        dtype: str = "float16",
        skip_chunks: Iterable[int] = (),
        on_chunk: Callable[[int], None] | None = None,
    ) -> int:
        """Capture ``sites`` of every prompt into ``sink`` (written here, from each chunk's ``run``)."""
        return stream.capture_into(
            self,
            prompts,
            sites,
            sink,
            batch_size=batch_size,
            positions=positions,
            dtype=dtype,
            skip_chunks=skip_chunks,
            on_chunk=on_chunk,
            make_chunk=self._capture_chunk,
        )

    def _capture_chunk(
        self, part: Sequence[str], sites: Sequence[Site], positions: Positions, index: int, first: int
    ) -> CaptureChunk:
        """One chunk: the service tokenises ``part`` (ids and token strings in one call), then ``run``."""
        frame = Frame()
        out, tensors = self._call("tokenize", {"prompts": codec.encode_prompts(part, frame), "strings": True}, frame)
        batch = codec.decode_batch(out["batch"], tensors)
        result = self.run(batch, capture=[str(s) for s in sites], positions=positions, logits="none")
        return CaptureChunk(
            index=index,
            prompt_ids=list(range(first, first + batch.size)),
            token_ids=batch.input_ids,
            lengths=batch.lengths.tolist(),
            tokens=out["strings"],
            positions=result.cache.positions,
            valid=result.cache.valid,
            acts=dict(result.cache.items()),
        )

    # ------------------------------------------------------------------ weights: read-only
    def trainer(self, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> Trainer:
        self._read_only("trainer")

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> int:
        self._read_only("set_parameters")

    def parameter_names(self) -> list[str]:
        raise NotImplementedError(
            "a served model does not send its weights; load the model locally (interplab.load_model) to read them"
        )

    def get_parameters(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "a served model does not send its weights; load the model locally (interplab.load_model) to read them"
        )

    def _read_only(self, what: str) -> NoReturn:
        raise ReadOnlyModelError(
            f"{what}: the served model {self.served_name!r} is shared by every user of the service and is "
            "read-only; train on a model of your own (interplab.load_model or a pipeline)"
        )

    def close(self) -> None:
        """Nothing to release here (the session holds the connections; the model stays served)."""

    def __repr__(self) -> str:
        return f"RemoteModel({self.served_name!r} at {self.session.url}, weights {self.weight_hash})"


if TYPE_CHECKING:

    def _is_a_backend(model: RemoteModel) -> Backend:  # mypy holds RemoteModel to the protocol
        return model
