"""``PipelineModel``: the Ray backend, a facade over a :class:`~interplab.runtime.scheduler.Scheduler`.

    pipe = PipelineModel("smollm2-135m", ParallelConfig(stages=2))
    out = pipe.run(prompts, capture=["resid_pre.20"], positions=[-1])   # as HookedModel.run

The driver holds the model's skeleton (config, tokenizer, sites; weights on the meta device) to
validate and tokenise; the scheduler's stage actors hold the weights and run the passes. It
implements :class:`~interplab.engine.backend.Backend` as :class:`~interplab.engine.hooked.HookedModel` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from interplab.engine.backend import CaptureSink
from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention
from interplab.engine.plan import KVPrefix, Positions, resolve_positions
from interplab.engine.results import GradResult, LogitsMode, Metric, Prompts, RunResult, StageRequest
from interplab.engine.sites import Site, parse_sites
from interplab.engine.tokens import TokenBatch
from interplab.engine.training import AdamConfig
from interplab.engine.work import LayerWork
from interplab.runtime import cluster
from interplab.runtime.config import ParallelConfig
from interplab.runtime.errors import reraise
from interplab.runtime.parameters import PipelineWeights
from interplab.runtime.scheduler import MakeTasks, Scheduler
from interplab.runtime.sink import StoreSink
from interplab.runtime.split import model_bytes, resolve_stages
from interplab.runtime.task import StageSpan, StageTask
from interplab.runtime.training import PipelineTrainer

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel
    from interplab.models.arch.base import ArchSpec

Key = TypeVar("Key")


class PipelineModel:
    """A model split into stages on Ray actors, with data-parallel replicas. See the module docstring."""

    def __init__(
        self,
        model: str,
        parallel: ParallelConfig,
        *,
        dtype: str = "float32",
        seed: int = 0,
        capacity_bytes: int | None = None,
        layer_work: Callable[[HookedModel], LayerWork | None] | None = None,
    ) -> None:
        from interplab.runtime.skeleton import load_skeleton

        self.skeleton = sk = load_skeleton(model, dtype=dtype, seed=seed)
        sizes = model_bytes(sk) if parallel.stages == "auto" else None
        work = layer_work(sk) if layer_work is not None else None  # given the meta-device skeleton
        ranges = resolve_stages(parallel, sk.n_layers, sizes, capacity_bytes, work)
        self.scheduler = Scheduler(model, parallel, ranges, sk.n_layers, dtype=dtype, seed=seed)
        self.weights = PipelineWeights(self.scheduler, sk.spec, sk.config)

    # ------------------------------------------------------------------ shape and config
    @property
    def parallel(self) -> ParallelConfig:
        return self.scheduler.parallel

    @property
    def name(self) -> str:
        return self.skeleton.name

    @property
    def weight_hash(self) -> str:
        return self.skeleton.weight_hash

    @property
    def tokenizer(self) -> Any:
        return self.skeleton.tokenizer

    @property
    def config(self) -> Any:
        return self.skeleton.config

    @property
    def spec(self) -> ArchSpec:
        return self.skeleton.spec

    @property
    def n_layers(self) -> int:
        return self.skeleton.n_layers

    @property
    def n_heads(self) -> int:
        return self.skeleton.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.skeleton.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.skeleton.d_model

    @property
    def head_dim(self) -> int:
        return self.skeleton.head_dim

    @property
    def d_mlp(self) -> int:
        return self.skeleton.d_mlp

    @property
    def d_vocab(self) -> int:
        return self.skeleton.d_vocab

    @property
    def has_resid_mid(self) -> bool:
        return self.skeleton.has_resid_mid

    @property
    def stage_ranges(self) -> list[tuple[int, int]]:
        return list(self.scheduler.stage_ranges)

    @property
    def n_stages(self) -> int:
        return self.scheduler.n_stages

    def stage_of(self, site: Site | str) -> int:
        return self.scheduler.stage_of(self.validate_site(site))

    @property
    def local_model(self) -> None:
        """None: the weights live in the stage actors."""
        return None

    def stage_pids(self, replica: int = 0) -> list[int]:
        """Process ids of a replica's stage actors (for monitoring and fault-injection tests)."""
        import ray

        return [pid for pid, _ in ray.get([a.ping.remote() for a in self.scheduler.replicas[replica].actors])]

    def stage_actor(self, stage: int, replica: int = 0) -> Any:
        return self.scheduler.replicas[replica].actors[stage]

    # ------------------------------------------------------------------ tokens and sites
    def sites(self, kinds: Iterable[str] | None = None) -> list[Site]:
        return self.skeleton.sites(kinds)

    def validate_site(self, site: Site | str) -> Site:
        return self.skeleton.validate_site(site)

    def tokenize(self, prompts: Prompts) -> TokenBatch:
        return self.skeleton.tokenize(prompts)

    def to_str_tokens(self, text: str) -> list[str]:
        return self.skeleton.to_str_tokens(text)

    def _validate(
        self, capture: Sequence[Site | str], interventions: Sequence[Intervention], grad_sites: Sequence[Site | str] = ()
    ) -> tuple[list[Site], list[Site]]:
        checked = [self.validate_site(s) for s in parse_sites(list(capture))] if capture else []
        grads = [self.validate_site(s) for s in parse_sites(list(grad_sites))] if grad_sites else []
        for item in interventions:
            self.validate_site(item.site)
        return checked, grads

    # ------------------------------------------------------------------ forward passes
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
        """As :meth:`HookedModel.run` (``grad=True`` is not available: use ``trainer`` or ``gradients``;
        ``keep_kv`` gathers every stage's keys/values, e.g. as a prefix for :meth:`run_stages`)."""
        if grad:
            raise ValueError(
                "PipelineModel.run(grad=True) is not supported: the graph lives in the stage actors; "
                "use trainer(...) for training or gradients(...) for site gradients"
            )
        batch = self.tokenize(prompts)
        sites, _ = self._validate(capture, interventions)
        pos, valid = resolve_positions(positions, batch.lengths, batch.seq_len)
        scheduler = self.scheduler
        # keep_kv: every layer's keys/values, so every stage runs
        upto, stop, with_head = scheduler.last_stage_needed(
            sites, interventions, "last" if keep_kv and logits == "none" else logits
        )
        with_head = with_head and logits != "none"
        parts = scheduler.micro_parts(batch, interventions)
        results: dict[Any, tuple[list[Any], Any]] = {}

        def maker(mb: int, lo: int, hi: int) -> MakeTasks:
            return lambda call: scheduler.lend_cores(
                scheduler.chain_tasks(
                    call,
                    mb,
                    batch,
                    lo,
                    hi,
                    mode="run",
                    capture=sites,
                    interventions=interventions,
                    positions=positions,
                    logits=logits,
                    upto=upto,
                    stop=stop,
                    with_head=with_head,
                    emit_last=with_head and logits != "none",
                    keep_kv=keep_kv,
                ),
                mb,
                len(parts),
            )

        def items() -> Iterator[tuple[int, MakeTasks]]:
            for mb, (lo, hi) in enumerate(parts):
                yield mb, maker(mb, lo, hi)

        if not (upto == scheduler.n_stages - 1 and not keep_kv and scheduler.graphs.run(items(), results)):
            scheduler.drive(items(), lambda key, sides, out: results.__setitem__(key, (sides, out)), window=len(parts))
        ordered = [results[mb] for mb in range(len(parts))]
        sides = [side for mb_sides, _ in ordered for side in mb_sides]
        kv = None
        if keep_kv:  # each side is (captures, {layer: (k, v)}); micro-batches are rows, in order
            kv = concat_kv([k for _, k in sides])
            sides = [c for c, _ in sides]
        values = concat_caches(sides, sites)
        out_logits = torch.cat([o for _, o in ordered], dim=0) if with_head and logits != "none" else None
        return RunResult(out_logits, ActivationCache(values, pos, valid), batch, kv)

    def run_stage(
        self,
        batch: TokenBatch,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None = None,
        with_head: bool = False,
        interventions: Sequence[Intervention] = (),
        logits: LogitsMode = "all",
        prefix: KVPrefix | None = None,
        joins: Mapping[int, torch.Tensor] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """One :meth:`run_stages` pass, as :meth:`HookedModel.run_stage` without captures: layers
        ``[start, stop)`` from ``hidden`` and/or ``joins``; ``(output, an empty cache)``."""
        out: dict[int, torch.Tensor] = {}
        request = StageRequest(batch, start, stop, hidden, with_head, tuple(interventions), logits, prefix, joins, vocab)
        self.run_stages([(0, request)], out.__setitem__)
        pos, valid = resolve_positions(None, batch.lengths, batch.seq_len)
        return out[0], ActivationCache({}, pos, valid)

    def run_stages(self, requests: Iterable[tuple[Key, StageRequest]], on_done: Callable[[Key, torch.Tensor], None]) -> None:
        """Many mid-model passes, consumed lazily and streamed through the pipeline together so the
        stages work on different passes at once; ``on_done(key, output)`` in completion order. Each
        micro-batch's chain starts at the stage holding its rows' first layer (see
        :mod:`interplab.runtime.partial`)."""
        from interplab.runtime.partial import run_partial_calls

        run_partial_calls(self.scheduler, self.skeleton, requests, on_done)

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
        replica: int = 0,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run stage ``index`` alone (from layer ``start`` inside it) on ``hidden``, the previous
        stage's output or the ``resid_pre`` at ``start`` (None for the embedding on the first stage):
        ``(its output: hidden state, or logits on the last stage; its captures)``."""
        import ray

        if not 0 <= index < self.n_stages:
            raise ValueError(f"stage {index} does not exist: the pipeline has stages 0..{self.n_stages - 1}")
        sites, _ = self._validate(capture, interventions)
        wrong = [str(s) for s in [*sites, *(x.site for x in interventions)] if self.scheduler.stage_of(s) != index]
        if wrong:
            raise ValueError(f"sites {wrong} do not belong to stage {index} (layers {self.stage_ranges[index]})")
        spec = self.scheduler.specs[index]
        if start is not None and not spec.start <= start < spec.stop:
            raise ValueError(f"stage_forward: layer {start} is not in stage {index} (layers {spec.start}..{spec.stop - 1})")
        if hidden is None and (start or spec.start) != 0:
            raise ValueError(f"stage_forward: stage {index} from layer {start or spec.start} needs hidden (the resid_pre there)")
        task = StageTask(
            call=self.scheduler.new_call(),
            mb=0,
            prompt_ids=list(range(batch.size)),
            batch=batch,
            mode="run",
            capture=sites,
            interventions=list(interventions),
            span=StageSpan(start=start, with_head=spec.last, logits=logits),
        )
        out, side = self.stage_actor(index, replica).forward.options(num_returns=2).remote(task, hidden)
        try:
            return ray.get(out), ray.get(side)
        except Exception as exc:  # noqa: BLE001 - re-raised as the user's error
            reraise(exc)

    # ------------------------------------------------------------------ capture into the store
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
        """Capture ``sites`` for every prompt; each stage writes its own sites to ``sink``'s run.

        Chunk ``i`` holds prompts ``[i * batch_size, (i + 1) * batch_size)`` (ids count from 0);
        ``skip_chunks`` (e.g. from a resumed run) are not recomputed. ``on_chunk(i)`` is called on the
        driver as chunk ``i`` completes. Returns the number of chunks written. The caller commits."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        checked, _ = self._validate(sites, ())
        scheduler = self.scheduler
        upto, stop, with_head = scheduler.last_stage_needed(checked, (), "none")
        skip = set(skip_chunks)
        written = 0

        def maker(batch: TokenBatch, ids: list[int], target: StoreSink) -> MakeTasks:
            return lambda call: scheduler.chain_tasks(
                call,
                0,
                batch,
                0,
                batch.size,
                mode="run",
                capture=checked,
                interventions=(),
                positions=positions,
                logits="none",
                upto=upto,
                stop=stop,
                with_head=with_head,
                emit_last=False,
                sink=target,
                prompt_ids=ids,
            )

        def items() -> Iterator[tuple[int, MakeTasks]]:
            it = iter(prompts)
            for index in itertools.count():
                texts = list(itertools.islice(it, batch_size))
                if not texts:
                    return
                if index in skip:
                    continue
                batch = self.tokenize(texts)
                first = index * batch_size
                ids = list(range(first, first + len(texts)))
                tokens = tuple(
                    tuple(self.tokenizer.decode([int(t)]) for t in batch.input_ids[i, : int(batch.lengths[i])])
                    for i in range(batch.size)
                )
                target = StoreSink(sink.store_uri, sink.run_id, index, dtype, tokens)
                yield index, maker(batch, ids, target)

        def done(index: int, sides: list[Any], out: Any) -> None:
            nonlocal written
            written += 1
            if on_chunk is not None:
                on_chunk(index)

        scheduler.drive(items(), done)
        return written

    # ------------------------------------------------------------------ gradients
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
        """As :meth:`HookedModel.gradients`; ``metric`` (any picklable callable) runs on the last stage."""
        batch = self.tokenize(prompts)
        captured, grad_sites = self._validate(capture, interventions, sites)
        pos, valid = resolve_positions(positions, batch.lengths, batch.seq_len)
        scheduler = self.scheduler
        replica = scheduler.pick_replica()
        for attempt in itertools.count():
            try:
                sides, summary, lower = scheduler.backward_call(
                    batch,
                    metric,
                    mode="grad",
                    capture=captured,
                    grad_sites=grad_sites,
                    interventions=interventions,
                    positions=positions,
                    logits=logits,
                    replica=replica,
                )
                break
            except Exception as exc:  # noqa: BLE001
                if not cluster.retryable(exc) or attempt >= self.parallel.max_retries:
                    reraise(exc)
                cluster.wait_alive(scheduler.replicas[replica])
        per_stage = [lower.get(s, []) for s in range(scheduler.n_stages - 1)] + [summary["site_grads"]]
        grads = concat_caches([c for stage in per_stage for c in stage], grad_sites)
        cache = concat_caches([c for mb_sides in sides for c in mb_sides], list(captured) + grad_sites)
        return GradResult(
            summary["value"], ActivationCache(grads, pos, valid), ActivationCache(cache, pos, valid), summary["logits"]
        )

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 10, *, interventions: Sequence[Intervention] = ()) -> str:
        """Greedy continuation of one prompt (no KV cache; interventions apply at every step), as
        :meth:`HookedModel.generate`."""
        ids = self.tokenize(prompt).input_ids[0].tolist()
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        for _ in range(max_new_tokens):
            out = self.run(TokenBatch.from_ids([ids + new]), interventions=interventions, logits="last").logits
            if out is None:
                raise RuntimeError("the pipeline returned no logits")
            token = int(out[0].argmax())
            new.append(token)
            if token == eos:
                break
        return str(self.tokenizer.decode(new))

    # ------------------------------------------------------------------ weights
    def trainer(self, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> PipelineTrainer:
        """Adam per stage (state stays in the actors); see :mod:`interplab.runtime.training`."""
        return PipelineTrainer(self.scheduler, self.weights, self.skeleton, adam or AdamConfig(), trainable)

    def parameter_names(self) -> list[str]:
        return self.weights.names()

    def get_parameters(self) -> dict[str, torch.Tensor]:
        return self.weights.get()

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> int:
        return self.weights.set(values)

    def stage_parameters(self, replica: int = 0) -> dict[str, torch.Tensor]:
        """Every stage's parameters as held (a tied head also under its own name), for checks."""
        return self.weights.values(replica)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the stage actors and release their placement groups."""
        self.scheduler.close()

    def __enter__(self) -> PipelineModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PipelineModel({self.name!r}, stages={self.stage_ranges}, replicas={len(self.scheduler.replica_handles)})"


def concat_kv(parts: Sequence[dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (keys, values) with every micro-batch's rows concatenated (parts in micro-batch order)."""
    pieces: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part in parts:
        for layer, kv in part.items():
            pieces.setdefault(layer, []).append(kv)
    return {layer: (torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for layer, kvs in sorted(pieces.items())}


def concat_caches(parts: Sequence[ActivationCache | None], order: Sequence[Site]) -> dict[Site, torch.Tensor]:
    """Site -> rows of every micro-batch concatenated (parts of one site arrive in micro-batch order)."""
    pieces: dict[Site, list[torch.Tensor]] = {}
    for part in parts:
        if part is None:
            continue
        for site, value in part.items():
            pieces.setdefault(site, []).append(value)
    return {site: torch.cat(pieces[site], dim=0) for site in order if site in pieces}
