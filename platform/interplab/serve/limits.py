"""What one request may ask of a served model, and how requests are batched.

Every limit is per request and configurable (``interplab serve --limit max_rows=1024``, a serve
spec's ``limits:``). A request over one gets HTTP 413 whose message names the limit
(:class:`~interplab.serve.errors.LimitError`); the request is refused before any forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from interplab.engine.sites import Site
from interplab.engine.tokens import TokenBatch
from interplab.serve.errors import LimitError

MiB = 1 << 20


class ServeLimits(BaseModel):
    """Per-request limits.

    Attributes:
        max_request_bytes: the whole body (JSON and tensors).
        max_json_bytes: the JSON part.
        max_tensor_bytes: the tensors sent (safetensors part).
        max_rows: rows of a batch (``run``, ``gradients``, ``stage_forward``, each ``run_stages`` pass).
        max_tokens: rows x padded sequence length.
        max_response_bytes: tensors answered (captures, logits, gradients, keys/values), estimated
            from the shapes before the forward pass.
        max_new_tokens: ``generate``'s ``max_new_tokens``.
        max_stage_requests: passes in one ``run_stages`` call (the client splits longer iterables).
        max_user_in_flight: requests one user may have queued or running at once (HTTP 429 beyond).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(default=512 * MiB, ge=1)
    max_json_bytes: int = Field(default=16 * MiB, ge=1)
    max_tensor_bytes: int = Field(default=512 * MiB, ge=0)
    max_rows: int = Field(default=8192, ge=1)
    max_tokens: int = Field(default=1 << 20, ge=1)
    max_response_bytes: int = Field(default=1024 * MiB, ge=1)
    max_new_tokens: int = Field(default=512, ge=1)
    max_stage_requests: int = Field(default=256, ge=1)
    max_user_in_flight: int = Field(default=64, ge=1)

    def check_batch(self, batch: TokenBatch, what: str = "the batch") -> None:
        if batch.size > self.max_rows:
            raise LimitError("max_rows", self.max_rows, batch.size, f"{what}'s row count")
        tokens = batch.size * batch.seq_len
        if tokens > self.max_tokens:
            raise LimitError("max_tokens", self.max_tokens, tokens, f"{what}'s rows x sequence length")

    def check_response(self, nbytes: int) -> None:
        if nbytes > self.max_response_bytes:
            raise LimitError("max_response_bytes", self.max_response_bytes, nbytes, "the answer's estimated tensor bytes")


class BatchingConfig(BaseModel):
    """Cross-request batching of ``run`` calls (:mod:`interplab.serve.batching`).

    Attributes:
        enabled: merge concurrent ``run`` requests with the same plan into one forward pass.
        window_ms: how long the first request of a batch waits for others to arrive.
        max_rows / max_tokens: a merged batch's budget (rows; rows x padded length). A request
            bigger than the budget runs alone.
        max_requests: a batch with this many requests runs at once, without waiting out the window.
        regroup: until the requests the last pass answered are back (beside those queued when it
            ended), the next batch waits up to this share of that pass's duration (at most
            ``regroup_max_ms``) from its end: clients that send again at once then share one pass
            instead of splitting into two cohorts that alternate. 0: off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_ms: float = Field(default=5.0, ge=0)
    max_rows: int = Field(default=1024, ge=1)
    max_tokens: int = Field(default=1 << 16, ge=1)
    max_requests: int = Field(default=64, ge=1)
    regroup: float = Field(default=1.0, ge=0, le=4)
    regroup_max_ms: float = Field(default=250.0, ge=0)


def site_bytes(site: Site, rows: int, positions: int, seq_len: int, dims: dict[str, int], itemsize: int) -> int:
    """Bytes of one captured site (its kind's layout) for ``rows`` rows and ``positions`` positions."""
    sizes = {"b": rows, "p": positions, "s": seq_len, "h": 1 if site.head is not None else dims["n_heads"], **dims}
    count = 1
    for axis in site.kind.layout:
        count *= sizes[axis]
    return count * itemsize


def run_bytes(sites: Sequence[Site], batch: TokenBatch, positions: int, logits: str, dims: dict[str, int], itemsize: int) -> int:
    """Estimated answer bytes of a ``run``/``gradients`` call: captures plus logits."""
    total = sum(site_bytes(s, batch.size, positions, batch.seq_len, dims, itemsize) for s in sites)
    if logits == "all":
        total += batch.size * batch.seq_len * dims["vocab"] * itemsize
    elif logits == "last":
        total += batch.size * dims["vocab"] * itemsize
    return total


def positions_count(positions: object, seq_len: int) -> int:
    if positions is None:
        return seq_len
    if isinstance(positions, torch.Tensor):
        return int(positions.shape[-1]) if positions.ndim == 2 else int(positions.numel())
    return len(positions)  # type: ignore[arg-type]
