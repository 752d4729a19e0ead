"""One local Ray cluster for every runtime test, and pipelines shared by the tests that only read them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (``ray.init`` costs 6–10 s here): started once, shut down at the end."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        path = os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
        ray.init(
            address="local",  # our own cluster, even if another one on this machine is running
            num_cpus=2,
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
            # stage actors unpickle metrics and loss functions defined in these test modules
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


class PipelineCache:
    """Pipelines by (model, config), closed when evicted so at most a few hold actors at once."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.items: dict = {}

    def get(self, model: str, **config):
        from interplab.runtime import ParallelConfig
        from interplab.runtime.pipeline import PipelineModel

        key = (model, tuple(sorted((k, repr(v)) for k, v in config.items())))
        if key not in self.items:
            while len(self.items) >= self.keep:
                self.items.pop(next(iter(self.items))).close()
            self.items[key] = PipelineModel(model, ParallelConfig(**config))
        return self.items[key]

    def discard(self, pipe) -> None:
        for key, value in list(self.items.items()):
            if value is pipe:
                del self.items[key]
        pipe.close()

    def close(self) -> None:
        for pipe in self.items.values():
            pipe.close()
        self.items.clear()


@pytest.fixture(scope="session")
def pipelines(ray_cluster):
    cache = PipelineCache()
    yield cache
    cache.close()
