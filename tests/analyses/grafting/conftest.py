"""The runtime tests' local Ray cluster (one per session) for the pipeline finetune test."""

from tests.runtime.conftest import ray_cluster  # noqa: F401 - a fixture
