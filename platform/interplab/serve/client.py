"""Connecting to a model service: ``connect(URL, token=...)`` and the session's HTTP calls.

    session = connect("http://head:8000", token=os.environ["INTERPLAB_TOKEN"])
    model = session.model("smollm2-135m")        # a RemoteModel: the engine's Backend protocol
    model.run(prompts, capture=["resid_pre.5"], positions=[-1])

A session is thread-safe (one ``httpx.Client``, a pool of connections): threads may share it and
their ``run`` calls are batched by the service. Error answers become exceptions
(:func:`interplab.serve.errors.from_body`): the engine's own classes for user errors, never anything
unpickled.

Faults: an answer that is not the service's own (a 5xx from Ray Serve's proxy, e.g. the replica
died mid-request and Serve is restarting it) or a dropped connection is retried ``retries`` times
(every operation is a pure function of its request, so a retry is safe), waiting 0.5 s, 1 s, 2 s ...
between tries; after that the call raises :class:`~interplab.serve.errors.ServiceUnavailable`
(``status`` 503) saying what happened.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from interplab.serve.errors import ServiceUnavailable, UnknownModelError, from_body
from interplab.serve.wire import CONTENT_TYPE, Frame, decode_frame

if TYPE_CHECKING:
    from interplab.serve.remote import RemoteModel

TOKEN_ENV = "INTERPLAB_TOKEN"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 2
_ANSWER_LIMIT = 1 << 40  # answers come from the service the user chose to trust; its own limits apply


class Session:
    """A connection to one Serve HTTP proxy (see the module docstring)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> None:
        import httpx

        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url.rstrip("/")
        self.retries = retries
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
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                response = self._http.post(f"{self.url}/{name}/{op}", content=body, headers=self._headers)
            except httpx.TimeoutException as exc:  # the service may still be working on it: not retried
                raise ServiceUnavailable(f"{op} on {name!r} at {self.url} timed out: {exc}", status=503) from None
            except httpx.TransportError as exc:
                failure = f"no answer: {type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500 and not _json(response):
                failure = f"HTTP {response.status_code} from Ray Serve: {response.text.strip()[:200]}"
                continue
            break
        else:
            tries = f" after {self.retries + 1} tries" if self.retries else ""
            raise ServiceUnavailable(
                f"{op} on {name!r} at {self.url} failed{tries} ({failure}): a replica failed mid-request or is "
                "restarting (Ray Serve restarts it); try again shortly",
                status=503,
            )
        if response.status_code == 200:
            return decode_frame(response.content, max_json_bytes=_ANSWER_LIMIT, max_tensor_bytes=_ANSWER_LIMIT)
        if response.status_code == 404 and not _json(response):
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


def _json(response: Any) -> bool:
    """Whether an answer is the service's own (a JSON error), not one of Ray Serve's proxy."""
    return str(response.headers.get("content-type", "")).startswith("application/json")


def connect(
    url: str, token: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES
) -> Session:
    """A session with the model service at ``url`` (Serve's HTTP address, e.g. ``http://head:8000``).

    ``token``: the bearer token the service's tokens file gives you; default ``$INTERPLAB_TOKEN``.
    ``retries``: how often a call is sent again after a replica failure (see the module docstring)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"connect({url!r}) needs a token: pass token=... or set ${TOKEN_ENV}")
    return Session(url, token, timeout_s=timeout_s, retries=retries)
