"""Shared pieces of the GPU tests: the device under test, prompts, metrics (picklable: they run in
stage actors, which import this module from ``bench/gpu_tests`` on their ``PYTHONPATH``), a bounded
wait, and how to recognise NCCL refusing to run where it cannot."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

# The device under test. "cpu" runs the same tests with CPU stages (gpus_per_stage 0), which checks
# the tests themselves on a machine without a GPU; it exercises no CUDA and no NCCL.
DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
GPUS_PER_STAGE = 0.5 if DEVICE == "cuda" else 0.0  # two stage actors (or replicas) share the one GPU

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "gemma2", "olmo2"]
# float32 on both devices; cuBLAS and SDPA reduce in another order than the CPU kernels
TOL = dict(rtol=1e-4, atol=1e-4)
ANSWER, WRONG = 5, 9
CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Alice went to the park, Alice gave a ball to",
]
CORRUPT = [
    "When Mary and John went to the store, Mary gave a drink to",
    "When Tom and Alice went to the park, Tom gave a ball to",
]
PROMPTS = [*CLEAN, "The city of Paris is in"]  # unequal lengths: padded rows

# What NCCL (or Ray's NCCL channel) says when it cannot run here, and what the report should say.
REFUSALS = [
    ("duplicate gpu", "NCCL refused two ranks on one GPU ('Duplicate GPU detected'): stages sharing a GPU "
                      "cannot talk over NCCL here; it needs one GPU per stage/replica"),
    # NCCL's duplicate-GPU check fails the communicator with "invalid usage"; CuPy's error says no
    # more (the reason is in the Ray worker's log with NCCL_DEBUG=WARN), torch's adds NCCL's last error
    ("invalid usage", "NCCL refused with 'invalid usage', which for two ranks on one GPU is its duplicate-GPU "
                      "check: stages sharing a GPU cannot talk over NCCL here; it needs one GPU per stage/replica"),
    ("requires cupy", "Ray's NCCL channel needs CuPy, which is not installed"),
    ("no module named 'cupy'", "Ray's NCCL channel needs CuPy, which is not installed"),
    ("nccl actor has no gpus", "Ray gave the stage actors no GPU"),
]


def logit_diff(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    return (logits[:, ANSWER] - logits[:, WRONG]).mean()


def next_token_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    targets = batch.input_ids[:, 1:]
    mask = batch.attention_mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask], targets[mask])


def sites_of(model: Any) -> list[str]:
    """Sites of every kind spread over all layers (so every stage owns some)."""
    out = ["embed", "resid_pre.0", "attn_out.0", "z.0", "pattern.1", "head_out.1", "q.1.2", "mlp_post.1",
           "resid_pre.2", "k.2", "v.2", "mlp_out.2", "resid_post.2", "final", "logits"]
    if model.has_resid_mid:
        out.append("resid_mid.1")
    return out


def weight_devices(worker: Any) -> set[str]:
    """The device types of a stage actor's weights (called in the actor through ``__ray_call__``)."""
    return {p.device.type for p in worker.hooked.model.parameters() if p.device.type != "meta"}


def cpu(value: Any) -> Any:
    """``value`` with every tensor in it on the CPU (dicts and lists walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu(v) for v in value)
    return value


def refusal(exc: BaseException) -> str | None:
    """The report's sentence when ``exc`` (or its cause chain) is NCCL refusing to run here, else None."""
    seen: list[str] = []
    while exc is not None and len(seen) < 8:
        seen.append(f"{type(exc).__name__}: {exc}".lower())
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(seen)
    for needle, sentence in REFUSALS:
        if needle in text:
            return sentence
    return None


def within(seconds: float, fn: Callable[[], Any], what: str) -> Any:
    """``fn()``, or an AssertionError naming ``what`` if it has not returned after ``seconds``
    (NCCL can wait for a peer forever; the thread is a daemon, so the test process still exits)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"within:{what}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{what} did not finish within {seconds:.0f} s (NCCL waiting on a peer?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")
