"""``HookedModel``: a Hugging Face causal LM with typed sites, captures, interventions and gradients.

    model = load_model("smollm2-135m")
    out = model.run(["The Eiffel Tower is in"], capture=["resid_pre.3", "z.5"], positions=[-1])
    out.cache["resid_pre.3"]          # [b, 1, d_model]

Every call builds a :class:`~interplab.engine.plan.HookPlan`, runs the layer loop with the plan
active and removes its hooks before returning. ``run_stage`` runs a contiguous block of layers on
given hidden states: the building block of the pipeline-parallel (Ray) backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from interplab.engine import attention, hooks, runner, stream
from interplab.engine.arena import CaptureArena
from interplab.engine.backend import CaptureSink
from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention
from interplab.engine.plan import Fork, HookPlan, KVPrefix, Positions
from interplab.engine.results import GradResult, LogitsMode, Metric, Prompts, RunResult, StageRequest
from interplab.engine.sites import Site, SiteError, SiteKind, parse_sites
from interplab.engine.stage_checks import check_joins, check_vocab, join_rows
from interplab.engine.stream import CaptureChunk
from interplab.engine.tokens import TokenBatch, decode, tokenize
from interplab.engine.training import AdamConfig, LocalTrainer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

Key = TypeVar("Key")


@dataclass
class StagePass:
    """One stage's forward pass: its output, the plan that ran (gradient tensors) and its captures."""

    output: torch.Tensor
    plan: HookPlan
    cache: ActivationCache


class HookedModel:
    """A loaded model plus the adapter that says where its sites are. See the module docstring."""

    def __init__(self, model: Any, tokenizer: object, *, name: str = "", weight_hash: str = "") -> None:
        """``model``: a transformers causal LM (``PreTrainedModel``); ``tokenizer``: its tokenizer."""
        from interplab.models.arch import arch_for_model_type

        # ``model`` and ``base`` stay Any (a PreTrainedModel and an nn.Module): code outside the engine
        # reads parameters off their submodules (``get_submodule(path).weight``, ``Tensor | Module``
        # to torch's stubs) without narrowing
        self.model: Any = model
        # a PreTrainedTokenizerBase, which the loader holds as ``object`` (interplab.models.loading.LoadedModel)
        self.tokenizer = cast("PreTrainedTokenizerBase", tokenizer)
        self.name = name
        self.weight_hash = weight_hash
        self.config: PretrainedConfig = self.model.config
        self.spec = arch_for_model_type(self.config.model_type)
        self.base: Any = self.model.get_submodule(self.spec.base)
        self._layers: nn.ModuleList = self.base.get_submodule(self.spec.layers)  # every family's is a ModuleList
        config = self.config
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.d_model = int(config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or self.d_model // self.n_heads)
        self.d_mlp = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * self.d_model)
        self.d_vocab = int(config.vocab_size)
        self.has_resid_mid = not self.spec.parallel_residual(config)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers)
        self._arena = CaptureArena()
        self.sliding_window: int | None = getattr(config, "sliding_window", None)
        attention.register()
        config._attn_implementation = attention.ATTN_IMPLEMENTATION
        self._attn_layer = {id(layer.get_submodule(self.spec.attn)): i for i, layer in enumerate(self._layers)}

    # ------------------------------------------------------------------ structure
    def layer(self, index: int) -> nn.Module:
        return self._layers[index]

    @property
    def device(self) -> torch.device:
        params: Iterator[nn.Parameter] = self.model.parameters()
        for param in params:
            if param.device.type != "meta":
                return param.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        params: Iterator[nn.Parameter] = self.model.parameters()
        for param in params:
            if param.device.type != "meta":
                return param.dtype
        return torch.float32

    def sites(self, kinds: Iterable[str] | None = None) -> list[Site]:
        """Every site of this model (optionally only some kinds), in forward order."""
        wanted = {SiteKind(k) for k in kinds} if kinds is not None else set(SiteKind)
        out = [Site(SiteKind.EMBED)] if SiteKind.EMBED in wanted else []
        for layer in range(self.n_layers):
            for kind in SiteKind:
                if kind.layered and kind in wanted and self._has_kind(kind):
                    out.append(Site(kind, layer))
        out += [Site(k) for k in (SiteKind.FINAL, SiteKind.LOGITS) if k in wanted]
        return out

    def _has_kind(self, kind: SiteKind) -> bool:
        if kind == SiteKind.RESID_MID:
            return self.has_resid_mid
        if kind.split_input:
            return self.spec.qkv is not None
        if kind == SiteKind.MLP_IN:
            return self.spec.ln_mlp is not None
        return True

    def validate_site(self, site: Site | str) -> Site:
        """Parse and check a site against this model (layer/head in range, kind present)."""
        site = Site.parse(site)
        if site.layer is not None and site.layer >= self.n_layers:
            raise SiteError(
                f"site {site}: layer {site.layer} out of range; {self.name or 'this model'} has layers 0..{self.n_layers - 1}"
            )
        if site.head is not None and site.head >= self.n_heads:
            raise SiteError(f"site {site}: head {site.head} out of range; the model has heads 0..{self.n_heads - 1}")
        if site.kind == SiteKind.RESID_MID and not self.has_resid_mid:
            raise SiteError(
                f"site {site}: the {self.spec.name} family with parallel attention and MLP has no resid_mid "
                "(both read resid_pre); use resid_pre, attn_out or mlp_out"
            )
        if not self._has_kind(site.kind):
            raise SiteError(
                f"site {site}: the {self.spec.name} family has no per-head/MLP input sites (its attention and MLP "
                "outputs pass through post-norms, so heads do not add to the stream one by one)"
            )
        return site

    # ------------------------------------------------------------------ tokens
    def tokenize(self, prompts: Prompts) -> TokenBatch:
        return prompts if isinstance(prompts, TokenBatch) else tokenize(self.tokenizer, prompts)

    def to_str_tokens(self, text: str) -> list[str]:
        batch = self.tokenize(text)
        return [decode(self.tokenizer, [int(i)]) for i in batch.input_ids[0]]

    # ------------------------------------------------------------------ running
    def _plan(
        self,
        batch: TokenBatch,
        capture: Sequence[Site | str],
        interventions: Sequence[Intervention],
        grad_sites: Sequence[Site | str],
        positions: Positions,
        keep_grad: bool,
        prefix: KVPrefix | None = None,
        record_kv: bool = False,
    ) -> HookPlan:
        captured = [self.validate_site(s) for s in parse_sites(list(capture))] if capture else []
        differentiated = [self.validate_site(s) for s in parse_sites(list(grad_sites))] if grad_sites else []
        for item in interventions:
            self.validate_site(item.site)
        return HookPlan(
            capture=captured,
            interventions=interventions,
            grad_sites=differentiated,
            lengths=batch.lengths - (prefix.length if prefix else 0),
            seq_len=batch.seq_len - (prefix.length if prefix else 0),
            positions=positions,
            keep_grad=keep_grad,
            prefix=prefix,
            record_kv=record_kv,
        )

    def _execute(
        self,
        batch: TokenBatch,
        plan: HookPlan,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None,
        with_head: bool,
        logits: LogitsMode,
        joins: Mapping[int, torch.Tensor | Fork] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = batch.to(self.device)
        with self.activated(plan, range(start, stop)):
            starting = batch.size - sum(join_rows(j) for j in joins.values()) if joins else batch.size
            if hidden is not None:
                like = hidden = hidden.to(self.device)  # e.g. a stage request's, read on the CPU
            elif starting and start == 0:  # the rows that start at layer 0 start at the embedding
                hidden = like = runner.embed(self, batch.input_ids[:starting], plan)
            else:
                first = next((j for _, j in sorted((joins or {}).items()) if isinstance(j, torch.Tensor)), None)
                if first is None:
                    raise ValueError(f"run_stage: no rows at layer {start}: pass hidden or joins[{start}]")
                like = first
            offset = plan.prefix.length if plan.prefix is not None else 0
            ctx = runner.build_context(self, batch.attention_mask, like, start, stop, offset)
            last = batch.last_positions() - offset if with_head and logits == "last" else None
            with runner.last_positions_head(self, plan, stop, last):
                hidden = runner.run_layers(self, hidden, ctx, plan, start, stop, joins)
            return runner.unembed(self, hidden, plan, last, vocab) if with_head else hidden

    @contextmanager
    def activated(self, plan: HookPlan, layers: range) -> Iterator[None]:
        """``plan`` active in the attention kernel and its module hooks installed on ``layers``,
        for the duration of a pass (hooks removed after, whatever happens)."""
        token = attention.activate(plan, self._attn_layer)
        try:
            with hooks.installed(self, plan, layers):
                yield
        finally:
            attention.deactivate(token)

    def _last_needed_layer(self, plan: HookPlan) -> int | None:
        """The last layer a capture-only pass must run, or None if the head is needed."""
        if plan.interventions or plan.grad_sites:
            return None
        layers = [s.layer for s in plan.capture_sites if s.layer is not None]
        if any(s.layer is None and s.kind != SiteKind.EMBED for s in plan.capture_sites):
            return None
        return max(layers, default=-1)

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
        """Run a forward pass with captures and interventions.

        Args:
            prompts: text(s) or a :class:`TokenBatch`.
            capture: sites to record (after their interventions).
            interventions: applied in order at their sites; rows may carry different patches.
            positions: positions to capture (see :func:`~interplab.engine.plan.resolve_positions`).
            logits: ``"all"`` positions, each row's ``"last"`` real token, or ``"none"`` (stop after
                the last captured layer when nothing downstream is needed). On CPU, full logits and
                whole-activation captures may live in a reused buffer (:mod:`interplab.engine.arena`),
                which is never overwritten while anything still references them.
            grad: keep the autograd graph (for training or custom backward passes).
            keep_kv: also return every layer's keys/values (``RunResult.kv``), to reuse as a
                :class:`~interplab.engine.plan.KVPrefix` in :meth:`run_stage`.
        """
        batch = self.tokenize(prompts)
        plan = self._plan(batch, capture, interventions, (), positions, keep_grad=grad, record_kv=keep_kv)
        if (plan.capture_sites or logits == "all") and not grad:  # captures and full logits into reused memory
            plan.lease = self._arena.lease(self.dtype, self.device)
        stop, with_head = self.n_layers, True
        if logits == "none":
            last_layer = self._last_needed_layer(plan)
            if last_layer is not None:  # keep_kv: every layer's keys/values, still without the head
                stop, with_head = (self.n_layers if keep_kv else last_layer + 1), False
        with torch.set_grad_enabled(grad):
            out = self._execute(batch, plan, start=0, stop=stop, hidden=None, with_head=with_head, logits=logits)
        result_logits = out if with_head and logits != "none" else None
        if plan.lease is not None:
            self._arena.done(plan.lease, self.dtype)
        return RunResult(result_logits, self._cache(plan), batch, plan.kv if keep_kv else None)

    def run_stage(
        self,
        batch: TokenBatch,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None = None,
        with_head: bool = False,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        grad: bool = False,
        prefix: KVPrefix | None = None,
        joins: Mapping[int, torch.Tensor | Fork] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run layers ``[start, stop)`` (embedding first when ``hidden`` is None, head when ``with_head``).

        Returns the stage's output (hidden states ``[b, s, d]``, or logits with ``with_head``) and
        the captures of the sites this stage owns. With a ``prefix`` of length p, ``hidden`` holds
        positions ``p..s-1`` only, the first p positions' keys/values come from the prefix, and
        positions in captures and interventions count from p.

        ``joins`` lets rows start at different layers: ``joins[l]`` (``[r, s, d]``) are the
        ``resid_pre`` of r rows appended to the batch just before layer l. ``hidden`` then holds the
        rows running from ``start`` (None if none do), and the batch's rows are in that order: first
        ``hidden``'s, then each join's in layer order. Interventions on a layer may only name rows
        present by then. Not combined with captures or gradients (their row count would change).
        A join may be a :class:`~interplab.engine.plan.Fork`: copies of rows already in the batch.
        With ``start == 0`` and no ``hidden``, the rows that do not join later start at the
        embedding (so rows can fork from them).

        ``vocab`` (``Long[k]``, with the head) returns logits for those vocabulary columns only, in
        that order (``[..., k]``): a metric that reads a few tokens' logits skips the rest of the
        unembedding.
        """
        if joins:
            if vocab is not None:
                vocab = check_vocab(vocab, with_head, self.d_vocab)
            check_joins(batch, start, stop, hidden, joins, bool(capture) or grad)
            plan = self._plan(batch, [], interventions, (), positions, keep_grad=False, prefix=prefix)
            with torch.no_grad():
                out = self._execute(
                    batch,
                    plan,
                    start=start,
                    stop=stop,
                    hidden=hidden,
                    with_head=with_head,
                    logits=logits,
                    joins=joins,
                    vocab=vocab,
                )
            return out, self._cache(plan)
        stage = self.stage_pass(
            batch,
            start=start,
            stop=stop,
            hidden=hidden,
            with_head=with_head,
            capture=capture,
            interventions=interventions,
            positions=positions,
            logits=logits,
            grad=grad,
            prefix=prefix,
            vocab=vocab,
        )
        return stage.output, stage.cache

    def run_stages(self, requests: Iterable[tuple[Key, StageRequest]], on_done: Callable[[Key, torch.Tensor], None]) -> None:
        """Many :meth:`run_stage` calls, ``on_done(key, output)`` after each: one after another here;
        a pipeline backend streams them through its stages together."""
        for key, r in requests:
            output, _ = self.run_stage(
                r.batch,
                start=r.start,
                stop=r.stop,
                hidden=r.hidden,
                with_head=r.with_head,
                interventions=r.interventions,
                logits=r.logits,
                prefix=r.prefix,
                joins=r.joins,
                vocab=r.vocab,
            )
            on_done(key, output)

    # ------------------------------------------------------------------ one stage
    @property
    def stage_ranges(self) -> list[tuple[int, int]]:
        """One stage holding every layer."""
        return [(0, self.n_layers)]

    def stage_of(self, site: Site | str) -> int:
        self.validate_site(site)
        return 0

    @property
    def local_model(self) -> HookedModel:
        return self

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
        """The whole model as stage 0, from layer ``start`` (0: the embedding first) to the logits."""
        if index != 0:
            raise ValueError(f"stage {index} does not exist: a single-process model is one stage (index 0)")
        start = 0 if start is None else start
        if hidden is None and start != 0:
            raise ValueError(f"stage_forward: starting at layer {start} needs hidden (the resid_pre there)")
        with torch.no_grad():
            return self.run_stage(
                batch,
                start=start,
                stop=self.n_layers,
                hidden=hidden,
                with_head=True,
                capture=capture,
                interventions=interventions,
                logits=logits,
            )

    def stage_pass(
        self,
        batch: TokenBatch,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None = None,
        with_head: bool = False,
        capture: Sequence[Site | str] = (),
        interventions: Sequence[Intervention] = (),
        grad_sites: Sequence[Site | str] = (),
        positions: Positions = None,
        logits: LogitsMode = "all",
        grad: bool = False,
        prefix: KVPrefix | None = None,
        vocab: torch.Tensor | None = None,
        keep_kv: bool = False,
    ) -> StagePass:
        """Like :meth:`run_stage`, but keep the plan: a pipeline stage's forward half of a backward pass.

        With ``grad_sites`` (or ``grad``) the autograd graph is kept; ``StagePass.plan.grad_tensors``
        holds the tensors of the gradient sites and :meth:`site_grads` turns their gradients into the
        capture layout, as :meth:`gradients` does. ``keep_kv`` records the stage's keys/values in
        ``StagePass.plan.kv`` (as ``run(keep_kv=True)``).
        """
        if vocab is not None:
            vocab = check_vocab(vocab, with_head, self.d_vocab)
        sites = list(capture) + list(grad_sites)
        plan = self._plan(
            batch,
            sites,
            interventions,
            grad_sites,
            positions,
            keep_grad=grad or bool(grad_sites),
            prefix=prefix,
            record_kv=keep_kv,
        )
        with torch.set_grad_enabled(plan.keep_grad):
            out = self._execute(
                batch, plan, start=start, stop=stop, hidden=hidden, with_head=with_head, logits=logits, vocab=vocab
            )
        return StagePass(out, plan, self._cache(plan))

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
        """Gradients of a scalar ``metric(logits, batch)`` with respect to site activations.

        Gradients come back in the capture layout. For ``head_out`` the gradient of every head is
        the gradient at the output projection's output (the heads' contributions are summed there);
        for ``resid_mid`` it is the gradient at ``attn_out`` (which only feeds ``resid_mid``).
        """
        batch = self.tokenize(prompts)
        plan = self._plan(batch, list(capture) + list(sites), interventions, sites, positions, keep_grad=True)
        with torch.enable_grad():
            out = self._execute(batch, plan, start=0, stop=self.n_layers, hidden=None, with_head=True, logits=logits)
            value = metric(out, batch)
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
            keys = [s.all_heads() for s in parse_sites(list(sites))]
            tensors = [plan.grad_tensors[k] for k in keys]
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
        cache = self._cache(plan, detach=True)
        return GradResult(value.detach(), self.site_grads(plan, sites, grads), cache, out.detach())

    def site_grads(self, plan: HookPlan, sites: Sequence[Site | str], grads: Sequence[torch.Tensor | None]) -> ActivationCache:
        """Gradients of ``plan.grad_tensors`` (one per site, None if unused) in the capture layout."""
        values: dict[Site, torch.Tensor] = {}
        for site, g in zip(parse_sites(list(sites)), grads):
            key = site.all_heads()
            g = torch.zeros_like(plan.grad_tensors[key]) if g is None else g
            if key in plan.grad_derive:
                g = plan.grad_derive[key](g)
            if key.kind == SiteKind.HEAD_OUT:
                g = g.unsqueeze(2).expand(-1, -1, self.n_heads, -1)
            g = plan.gather(g.detach(), heads_first=key.kind.heads_first)
            values[site] = plan.head_of(site, g)
        return ActivationCache(values, plan.positions, plan.valid)

    def _cache(self, plan: HookPlan, detach: bool = False) -> ActivationCache:
        values: dict[Site, torch.Tensor] = {}
        for key, requested in plan.capture_sites.items():
            if key not in plan.captured:
                continue
            value = plan.captured[key]
            value = value.detach() if detach else value
            for site in requested:
                values[site] = plan.head_of(site, value)
        return ActivationCache(values, plan.positions, plan.valid)

    # ------------------------------------------------------------------ conveniences
    def capture_stream(
        self,
        prompts: Iterable[str],
        sites: Sequence[Site | str],
        *,
        batch_size: int = 16,
        positions: Positions = None,
        interventions: Sequence[Intervention] = (),
    ) -> Iterator[CaptureChunk]:
        """Capture ``sites`` over a prompt iterable of any size, one CPU chunk per batch
        (:func:`interplab.engine.stream.capture_stream`)."""
        return stream.capture_stream(
            self, prompts, sites, batch_size=batch_size, positions=positions, interventions=interventions
        )

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 10, *, interventions: Sequence[Intervention] = ()) -> str:
        """Greedy continuation of one prompt (no KV cache; interventions apply at every step)."""
        ids = self.tokenize(prompt).input_ids[0].tolist()
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        for _ in range(max_new_tokens):
            batch = TokenBatch.from_ids([ids + new])
            logits = self.run(batch, interventions=interventions, logits="last").logits
            if logits is None:
                raise RuntimeError("a generation step returned no logits")
            token = int(logits[0].argmax())
            new.append(token)
            if token == eos:
                break
        return decode(self.tokenizer, new)

    # ------------------------------------------------------------------ capture into a sink
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
        """Capture ``sites`` of every prompt into ``sink`` (see :meth:`Backend.capture` and
        :func:`interplab.engine.stream.capture_into`)."""
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
        )

    # ------------------------------------------------------------------ weights
    def trainer(self, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> LocalTrainer:
        """Adam over this process's parameters (see :mod:`interplab.engine.training`)."""
        return LocalTrainer(self, adam or AdamConfig(), trainable)

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]

    def get_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu").clone() for name, p in self.model.named_parameters()}

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> int:
        by_name = dict(self.model.named_parameters(remove_duplicate=False))
        for name, value in values.items():
            if name not in by_name:
                known = self.parameter_names()
                raise ValueError(f"unknown parameter {name!r}: the model has {len(known)} parameters, e.g. {known[:3]}")
            if tuple(value.shape) != tuple(by_name[name].shape):
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(by_name[name].shape)}, got a value of shape {tuple(value.shape)}"
                )
        with torch.no_grad():
            for name, value in values.items():
                param = by_name[name]
                param.copy_(value.to(param.device, param.dtype))
        return len(values)

    def close(self) -> None:
        """Nothing to release: the weights go with the object."""


__all__ = ["GradResult", "HookedModel", "LogitsMode", "Metric", "Prompts", "RunResult", "StagePass"]
