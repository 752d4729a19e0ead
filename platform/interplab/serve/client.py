"""Connecting to a model service: ``connect(URL, token=...)`` and the session's HTTP calls.

    session = connect("http://head:8000", token=os.environ["INTERPLAB_TOKEN"])
    model = session.model("smollm2-135m")        # a RemoteModel: the engine's Backend protocol
    model.run(prompts, capture=["resid_pre.5"], positions=[-1])

A session is thread-safe (one ``httpx.Client``, a pool of connections): threads may share it and
their ``run`` calls are batched by the service. Error answers become exceptions
(:func:`interplab.serve.errors.from_body`): the engine's own classes for user errors, never anything
unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from interplab.serve.errors import ServiceUnavailable, UnknownModelError, from_body
from interplab.serve.wire import CONTENT_TYPE, Frame, decode_frame

if TYPE_CHECKING:
    from interplab.serve.remote import RemoteModel

TOKEN_ENV = "INTERPLAB_TOKEN"
DEFAULT_TIMEOUT_S = 600.0
_ANSWER_LIMIT = 1 << 40  # answers come from the service the user chose to trust; its own limits apply


class Session:
    """A connection to one Serve HTTP proxy (see the module docstring)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits)

    def model(self, name: str) -> RemoteModel:
        """The served model ``name`` (its ``info`` is fetched now: an unknown name fails here)."""
        from interplab.serve.remote import RemoteModel

        return RemoteModel(self, name)

    def models(self) -> list[str]:
        """Names of the models served at this address (Serve's route table)."""
        import httpx

        try:
            routes = self._http.get(f"{self.url}/-/routes").json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServiceUnavailable(f"cannot list the models at {self.url}: {exc}") from None
        return sorted(str(v) for v in routes.values()) if isinstance(routes, dict) else []

    def call(
        self, name: str, op: str, header: Mapping[str, Any], frame: Frame | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """POST one operation to model ``name``; the answer's JSON and tensors, or the error raised."""
        import httpx

        body = (frame or Frame()).encode({**header, "model": name})
        try:
            response = self._http.post(f"{self.url}/{name}/{op}", content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"{op} on {name!r} at {self.url} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            return decode_frame(response.content, max_json_bytes=_ANSWER_LIMIT, max_tensor_bytes=_ANSWER_LIMIT)
        if response.status_code == 404 and not response.headers.get("content-type", "").startswith("application/json"):
            served = self.models()
            raise UnknownModelError(f"no model named {name!r} is served at {self.url}; served: {', '.join(served) or 'none'}")
        try:
            payload: object = response.json()
        except (ValueError, json.JSONDecodeError):
            payload = response.text
        raise from_body(response.status_code, payload)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.url!r})"


def connect(url: str, token: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Session:
    """A session with the model service at ``url`` (Serve's HTTP address, e.g. ``http://head:8000``).

    ``token``: the bearer token the service's tokens file gives you; default ``$INTERPLAB_TOKEN``."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"connect({url!r}) needs a token: pass token=... or set ${TOKEN_ENV}")
    return Session(url, token, timeout_s=timeout_s)
