"""One interface, two backends: ``build_backend`` gives a local :class:`HookedModel` or a Ray pipeline.

Analyses call ``run``, ``gradients``, ``tokenize``, ``validate_site``, ``sites`` and the model's
sizes on whatever they get, and :func:`capture_to_store` / :func:`~interplab.runtime.training.make_trainer`
for captures to the store and training steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from interplab.engine.plan import Positions
from interplab.engine.sites import Site
from interplab.runtime.config import ParallelConfig
from interplab.runtime.split import LayerWork


def build_backend(
    model: str,
    parallel: ParallelConfig | dict | None = None,
    *,
    dtype: str = "float32",
    seed: int = 0,
    device: str = "cpu",
    layer_work: Callable[[Any], LayerWork | None] | None = None,
):
    """``parallel`` None or one stage with one replica: the single-process engine, no Ray. Else a pipeline.

    ``layer_work(skeleton)`` gives the relative compute of what will run (a
    :class:`~interplab.runtime.split.LayerWork`, or None) from the model's meta-device skeleton; a
    stage count is balanced by it (``parallel.balance: work``, see :class:`ParallelConfig`)."""
    if isinstance(parallel, dict):
        parallel = ParallelConfig.model_validate(parallel)
    if parallel is None or parallel.single_process:
        from interplab.models.loading import load_model

        return load_model(model, dtype=dtype, seed=seed, device=device)
    from interplab.runtime.pipeline import PipelineModel

    return PipelineModel(model, parallel, dtype=dtype, seed=seed, layer_work=layer_work)


def capture_to_store(
    backend,
    prompts: Iterable[str],
    sites: Sequence[Site | str],
    writer,
    *,
    batch_size: int = 16,
    positions: Positions = None,
    dtype: str = "float16",
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Capture ``sites`` of every prompt into ``writer``'s run, chunk ``i`` = prompts of batch ``i``.

    Chunks already finished in the run (a resumed job) are skipped on the local backend; a pipeline's
    stages write their own sites. Returns the number of chunks written; the caller commits.
    """
    from interplab.runtime.pipeline import PipelineModel

    if isinstance(backend, PipelineModel):
        return backend.capture_to_store(prompts, sites, writer, batch_size=batch_size, positions=positions, dtype=dtype, on_chunk=on_chunk)
    done = writer.written_chunks()
    written = 0
    for chunk in backend.capture_stream(prompts, sites, batch_size=batch_size, positions=positions):
        if chunk.index in done:
            continue
        writer.write_capture_chunk(chunk, dtype=dtype)
        written += 1
        if on_chunk is not None:
            on_chunk(chunk.index)
    return written
