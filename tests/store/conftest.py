"""Fixtures for the store tests: a fresh local store, synthetic activation rows, a CLI runner."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner

from interplab.store import open_store


def make_rows(n: int, d: int, seed: int = 0, dtype=np.float32, prompt_offset: int = 0) -> dict:
    """Synthetic rows for one site: ``n`` rows of width ``d``, distinct (prompt_id, position) keys."""
    rng = np.random.default_rng(seed)
    return {
        "prompt_id": np.arange(n, dtype=np.int64) // 4 + prompt_offset,
        "position": np.arange(n, dtype=np.int32) % 4,
        "token_id": rng.integers(0, 50_000, n),
        "token": [f"tok{i}" for i in range(n)],
        "act": rng.standard_normal((n, d)).astype(dtype),
    }


def write_site(writer, chunk, site, layer, rows, head=None, dtype="float16"):
    return writer.write_activations(
        chunk, site, layer, head, rows["prompt_id"], rows["position"], rows["token_id"], rows["token"],
        rows["act"], dtype=dtype,
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture
def cli():
    from interplab.cli import store_cmds

    @click.group()
    def group() -> None:
        pass

    store_cmds.register(group)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(group, list(args), catch_exceptions=False)

    return invoke
