"""Shared pieces of the service benchmarks: a local Ray with Serve, deployments, IOI requests.

Not a benchmark itself. Every ``bench/serve_*.py`` starts its own local Ray (``start``), deploys
what it measures with :func:`deploy`, and shuts everything down on exit.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENS = {"alice": "alice-bench-token-0123456789", "bob": "bob-bench-token-0123456789ab"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(num_cpus: int) -> tuple[str, str]:
    """Local Ray (``num_cpus`` logical CPUs) and Serve's proxy on a free port: (base URL, tokens file)."""
    import logging

    import ray
    from ray import serve

    path = os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tokens = Path(tempfile.mkdtemp(prefix="interplab-bench-")) / "tokens.txt"
    tokens.write_text("".join(f"{token} {user}\n" for user, token in TOKENS.items()))
    return f"http://127.0.0.1:{port}", str(tokens)


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def deploy(
    name: str,
    tokens: str,
    *,
    model: str = "smollm2-135m",
    num_cpus: float = 2.0,
    num_gpus: float = 0.0,
    batching: dict | None = None,
    limits: dict | None = None,
) -> str:
    """Deploy ``model`` as ``name``; a replica given GPUs (``num_gpus``) computes on one."""
    from interplab.serve.deployment import deploy as deploy_spec
    from interplab.serve.spec import ServeSpec

    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    spec = ServeSpec(model=model, name=name, tokens=tokens, resources=resources, batching=batching or {}, limits=limits or {})
    return deploy_spec(spec)


def ioi_patch_requests(model, n: int, seed: int = 0):
    """``n`` single-patch requests on one IOI prompt: each patches the clean resid_pre of one
    (layer, position) into the corrupted prompt (cycling over layers x positions)."""
    from interplab.analyses.tasks import PairSet, ioi_pairs
    from interplab.engine import Intervention

    pairs = PairSet.tokenize(model.tokenizer, ioi_pairs(model.tokenizer, 1, seed=seed))
    sites = [f"resid_pre.{layer}" for layer in range(model.n_layers)]
    clean = model.run(pairs.clean, capture=sites, logits="none")
    seq = pairs.clean.seq_len
    out = []
    for i in range(n):
        layer, pos = (i // seq) % model.n_layers, i % seq
        value = clean.cache[sites[layer]][0, pos].clone()
        out.append((pairs.corrupted, [Intervention(sites[layer], "set", value=value, positions=[pos])]))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q))
