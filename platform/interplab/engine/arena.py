"""Reused memory for a forward pass's outputs on CPU: captured activations and full logits.

A forward pass that captures many sites keeps their tensors alive, so the allocator cannot hand
their memory to later operations and every capture lands on freshly mapped pages. On CPU, faulting
fresh pages in costs more than the capture itself (≈ 6 µs per 4 KiB page on our VMs: 177 MB of
SmolLM2 captures ≈ 0.25 s on a 0.6 s forward). :class:`CaptureArena` keeps a few flat buffers and
copies whole-activation captures into one of them (a memcpy into warm memory). Full logits are the
same story at a larger size (SmolLM2, 8 x 64 tokens: 100 MB, mapped afresh by every forward that
returns them); the unembedding writes them straight into the lease (``torch.mm(..., out=)``, the
same kernel ``nn.Linear`` runs, so the values are bit-identical).

A buffer is reused only when nothing outside the arena references its storage any more (the
storage's use count, so views the user derived from a capture keep it busy too); otherwise a call
takes another buffer or none. The first call with a given capture size allocates normally and
records the size; later calls get a buffer. GPUs do not need this (PyTorch's caching allocator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_BYTES = 1 << 30  # larger captures are not pooled: the arena would pin that much memory


def _free(buffer: torch.Tensor) -> bool:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # cannot tell: never reuse
        return False
    # the buffer itself and the temporary storage object hold one reference each
    count: int = use_count(buffer.untyped_storage()._cdata)
    return count <= 2


class Lease:
    """One call's bump allocator over a buffer (or over nothing: every request falls through)."""

    def __init__(self, buffer: torch.Tensor | None) -> None:
        self.buffer = buffer
        self.used = 0  # elements handed out (or asked for, when the buffer was too small)

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised tensor shaped like ``like`` in the buffer, or None if it does not fit."""
        return self.take_shape(like.shape, like.dtype)

    def take_shape(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised ``dtype`` tensor of ``shape`` in the buffer, or None if it does not fit."""
        if self.buffer is not None and dtype != self.buffer.dtype:
            return None
        start = self.used
        self.used += math.prod(shape)
        if self.buffer is None or self.used > self.buffer.numel():
            return None
        return self.buffer[start : self.used].view(tuple(shape))


class CaptureArena:
    """A pool of at most ``keep`` CPU buffers for captures (see the module docstring)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._buffers: list[torch.Tensor] = []
        self._need: dict[torch.dtype, int] = {}

    def lease(self, dtype: torch.dtype, device: torch.device | str) -> Lease:
        if torch.device(device).type != "cpu":
            return Lease(None)
        need = self._need.get(dtype, 0)
        if need == 0 or need * torch.finfo(dtype).bits // 8 > MAX_BYTES:
            return Lease(None)
        for buffer in self._buffers:
            if buffer.dtype == dtype and buffer.numel() >= need and _free(buffer):
                return Lease(buffer)
        if len(self._buffers) >= self.keep:
            free = [i for i, b in enumerate(self._buffers) if _free(b)]
            if not free:
                return Lease(None)
            self._buffers.pop(free[0])  # too small or another dtype, and unused: replace it
        buffer = torch.empty(need, dtype=dtype)
        self._buffers.append(buffer)
        return Lease(buffer)

    def done(self, lease: Lease, dtype: torch.dtype) -> None:
        """Remember how much the call needed, so the next lease is big enough."""
        self._need[dtype] = max(self._need.get(dtype, 0), lease.used)
