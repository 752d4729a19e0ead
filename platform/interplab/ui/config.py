"""What the dashboard serves and to whom: a validated, immutable configuration."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8300


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only to this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UIConfig(BaseModel):
    """The dashboard's settings (``interplab ui`` options).

    ``tokens``: a tokens path in the model service's format (:mod:`interplab.serve.auth`). It is
    required when ``host`` is not a loopback address (every page then needs a login), and it is what
    unlocks stopping jobs on any address. ``jobs_address``: the Ray dashboard / Jobs API URL
    (``http://HEAD:8265``); ``ray_address``: a Ray cluster to join for the served models
    (``HEAD:6379``); ``ray_token_file``: the Ray cluster's own token, when it uses token auth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str | None = None
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    tokens: Path | None = None
    jobs_address: str | None = None
    ray_address: str | None = None
    ray_token_file: str | None = None
    page_size: int = Field(default=50, ge=1, le=1000)
    max_grid_rows: int = Field(default=1000, ge=1, le=100_000)
    max_graph_edges: int = Field(default=3000, ge=10, le=100_000)

    @field_validator("jobs_address")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"the Jobs API address is the Ray dashboard's HTTP URL, e.g. http://HEAD:8265; got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _login_off_loopback(self) -> UIConfig:
        if not is_loopback(self.host) and self.tokens is None:
            raise ValueError(
                f"binding to {self.host} (not loopback) needs a login: pass --tokens PATH "
                "(the model service's tokens file or directory) or set $INTERPLAB_SERVE_TOKENS"
            )
        return self

    @property
    def login_required(self) -> bool:
        """Every page needs a login when the dashboard is reachable from other machines."""
        return not is_loopback(self.host)
