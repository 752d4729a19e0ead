"""The backend interface: what every way of running a model offers to analyses and jobs.

    def analysis(model: Backend) -> ...:
        out = model.run(prompts, capture=["resid_pre.5"], interventions=[...])

A :class:`~interplab.engine.hooked.HookedModel` runs in this process; a pipeline
(:class:`interplab.runtime.PipelineModel`) runs layers on Ray stage actors. Both implement
:class:`Backend`, so an analysis written against it runs unchanged on either, and the type checker
holds them to it (``interplab.runtime.build_backend`` returns a ``Backend``). Nothing outside
``interplab.runtime`` asks which backend it holds: what differs is expressed as data
(``stage_ranges``) or a capability (``local_model``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention
from interplab.engine.plan import Positions
from interplab.engine.results import GradResult, LogitsMode, Metric, Prompts, RunResult, StageRequest
from interplab.engine.sites import Site
from interplab.engine.stream import CaptureChunk
from interplab.engine.tokens import TokenBatch
from interplab.engine.training import AdamConfig, Trainer

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel
    from interplab.models.arch.base import ArchSpec

Key = TypeVar("Key")


class CaptureSink(Protocol):
    """Where :meth:`Backend.capture` writes chunks: a store run (``interplab.store.RunWriter``).

    A backend whose workers write their own sites opens writers on ``(store_uri, run_id)``."""

    @property
    def run_id(self) -> str: ...

    @property
    def store_uri(self) -> str: ...

    def write_capture_chunk(self, chunk: CaptureChunk, dtype: str = "float16") -> object: ...


class Backend(Protocol):
    """A model with typed sites: its shape, tokens, forward passes, gradients, captures and weights."""

    # ------------------------------------------------------------------ shape and config
    @property
    def name(self) -> str: ...
    @property
    def weight_hash(self) -> str: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def config(self) -> Any: ...
    @property
    def spec(self) -> ArchSpec: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def d_mlp(self) -> int: ...
    @property
    def d_vocab(self) -> int: ...
    @property
    def has_resid_mid(self) -> bool: ...

    @property
    def stage_ranges(self) -> list[tuple[int, int]]:
        """The layer block ``[start, stop)`` of each stage (one stage: ``[(0, n_layers)]``)."""
        ...

    def stage_of(self, site: Site | str) -> int:
        """The stage that owns ``site`` (embed: the first; final/logits: the last; else by layer)."""
        ...

    @property
    def local_model(self) -> HookedModel | None:
        """The in-process model holding every weight (for analyses that hook torch modules
        directly), or None where the weights live elsewhere."""
        ...

    # ------------------------------------------------------------------ tokens and sites
    def tokenize(self, prompts: Prompts) -> TokenBatch: ...

    def to_str_tokens(self, text: str) -> list[str]: ...

    def sites(self, kinds: Iterable[str] | None = None) -> list[Site]: ...

    def validate_site(self, site: Site | str) -> Site:
        """Parse and check ``site`` against the model (raises ``SiteError``)."""
        ...

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
    ) -> RunResult: ...

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
    ) -> GradResult: ...

    def generate(self, prompt: str, max_new_tokens: int = 10, *, interventions: Sequence[Intervention] = ()) -> str: ...

    def run_stages(self, requests: Iterable[tuple[Key, StageRequest]], on_done: Callable[[Key, torch.Tensor], None]) -> None:
        """Many mid-model forward passes, ``on_done(key, output)`` as each finishes (a pipeline
        streams them through its stages together; order of completion is not guaranteed)."""
        ...

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
        """Run stage ``index`` alone (from layer ``start`` inside it; default its first) on ``hidden``:
        its output (hidden state, logits on the last stage) and its captures. Every site must belong
        to the stage. For analyses that carry their own state from stage to stage."""
        ...

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
        """Capture ``sites`` of every prompt into ``sink``: chunk ``i`` holds prompts
        ``[i * batch_size, (i + 1) * batch_size)``; ``skip_chunks`` are not computed. Returns the
        number of chunks written; the caller commits."""
        ...

    # ------------------------------------------------------------------ weights
    def trainer(self, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> Trainer: ...

    def parameter_names(self) -> list[str]:
        """Every parameter's full name (a tied head appears once, under the embedding's name)."""
        ...

    def get_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter as a CPU copy, by :meth:`parameter_names`."""
        ...

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> int:
        """Copy ``values`` (any subset, by full name; a tied parameter under either name) in.
        An unknown name or a wrong shape is a ValueError and nothing is written."""
        ...

    def close(self) -> None: ...
