"""Fixtures for tests on a real Ray Serve on localhost (importable by other test folders' conftests).

One Ray session per pytest process: if another fixture (``tests/runtime``'s ``ray_cluster``) already
started Ray, it is reused and left to its owner. Served models are session-scoped: each deployment
loads its model once (~10 s) and every test that only reads it shares it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serve.helpers import ALICE, MODEL, write_tokens

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    url: str  # Serve's proxy, e.g. http://127.0.0.1:PORT
    name: str  # the served name (URL path)
    tokens: Path

    def session(self, token: str = ALICE):
        from interplab.serve import connect

        return connect(self.url, token=token)

    def model(self, token: str = ALICE):
        return self.session(token).model(self.name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory):
    """Ray (reused if running) with Serve's HTTP proxy on a free localhost port; tokens for alice and bob."""
    import ray
    from ray import serve

    started = False
    if not ray.is_initialized():
        path = os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        started = True
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    tokens = write_tokens(tmp_path_factory.mktemp("serve-tokens"))
    deployed: list[str] = []

    def deploy(name: str, **fields) -> Served:
        from interplab.serve.deployment import deploy as deploy_spec
        from interplab.serve.spec import ServeSpec

        fields.setdefault("resources", {"num_cpus": 0.2})
        spec = ServeSpec(model=fields.pop("model", MODEL), name=name, tokens=str(tokens), **fields)
        url = deploy_spec(spec)
        deployed.append(name)
        return Served(url.rsplit("/", 1)[0], name, tokens)

    yield deploy
    for name in deployed:
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - a test may have stopped it already
            pass
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture
def serve_app(serve_cluster):
    """Deploy applications for one test only: deleted when it ends, so their replicas and stage
    actors give their CPU shares back (the test cluster has 2 CPUs; a replica waiting for a share
    would wait forever)."""
    from ray import serve

    names: list[str] = []

    def deploy(name: str, **fields) -> Served:
        names.append(name)
        return serve_cluster(name, **fields)

    yield deploy
    for name in names:
        try:
            serve.delete(name)  # blocks until its replicas are gone
        except Exception:  # noqa: BLE001 - a test may have stopped it already
            pass


@pytest.fixture(scope="session")
def served_tiny(serve_cluster) -> Served:
    """tiny-llama with the default limits and batching."""
    return serve_cluster("tiny-llama")


@pytest.fixture(scope="session")
def remote_tiny(served_tiny):
    """A RemoteModel of ``served_tiny`` (alice's token)."""
    return served_tiny.model()
