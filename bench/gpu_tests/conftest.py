"""GPU tests (run by ``bench/gpu_check.sh``, not by CI): the engine and the Ray runtime on CUDA,
compared with the same computation on the CPU engine.

    python -m pytest -q -rA bench/gpu_tests                        # needs a CUDA GPU
    GPU_TESTS_DEVICE=cpu python -m pytest -q -rA bench/gpu_tests   # the same tests on CPU (checks the tests)

They live here, not under ``tests/``, because CI has no GPU and ``tests/`` runs on CPU only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_configure(config: pytest.Config) -> None:
    import torch

    from gpu_helpers import DEVICE

    if DEVICE not in ("cuda", "cpu"):
        raise pytest.UsageError(f"GPU_TESTS_DEVICE must be 'cuda' or 'cpu', got {DEVICE!r}")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"the GPU tests need CUDA, and torch {torch.__version__} sees no GPU "
            "(GPU_TESTS_DEVICE=cpu runs them on CPU to check the tests themselves)"
        )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with this machine's cores and (on CUDA) its one GPU."""
    import ray

    from gpu_helpers import DEVICE

    path = os.pathsep.join([str(REPO / "platform"), str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        num_gpus=1 if DEVICE == "cuda" else 0,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
        # stage actors unpickle gpu_helpers' metrics; NCCL says why it refuses in their logs
        runtime_env={"env_vars": {"PYTHONPATH": path, "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}},
    )
    yield ray
    ray.shutdown()
