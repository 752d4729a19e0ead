"""Fixtures of the service tests: a real Ray Serve on localhost (see fixtures.py) and an in-process server."""

from __future__ import annotations

import pytest

from tests.serve.fixtures import remote_tiny, serve_app, serve_cluster, served_tiny  # noqa: F401 - fixtures
from tests.serve.helpers import InProcess, write_tokens


@pytest.fixture(scope="session")
def local_tiny():
    from interplab import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def make_server(local_tiny, tmp_path_factory):
    """``make_server(limits=..., batching=...)``: a Server over the session's tiny-llama, in this process."""
    from interplab.serve.auth import TokenAuth
    from interplab.serve.limits import BatchingConfig, ServeLimits
    from interplab.serve.server import Server

    tokens = write_tokens(tmp_path_factory.mktemp("tokens"))
    made: list[InProcess] = []

    def make(limits: dict | None = None, batching: dict | None = None, token: str | None = None) -> InProcess:
        server = Server(local_tiny, name="tiny-llama", auth=TokenAuth(tokens), limits=ServeLimits(**(limits or {})),
                        batching=BatchingConfig(**(batching or {})))
        transport = InProcess(server) if token is None else InProcess(server, token)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.fixture(scope="session")
def inproc(make_server) -> InProcess:
    return make_server()
