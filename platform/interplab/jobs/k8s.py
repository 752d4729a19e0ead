"""``interplab k8s render``: a KubeRay ``RayJob`` (plus a ``ConfigMap`` holding the spec) for a job.

The RayJob brings up its own Ray cluster (head + autoscaled GPU worker group, token auth on),
runs ``python -m interplab.jobs run /etc/interplab/spec/spec.yaml --run-id RUN_ID`` on the head and
deletes the cluster when the job ends (``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``).
``backoffLimit`` retries re-run the same entrypoint with the same run id, which resumes the run.
The store comes from the ``interplab-store`` ConfigMap (``INTERPLAB_STORE``), optionally with S3
credentials from the ``interplab-s3`` Secret, or a shared PVC (``interplab-store``) mounted at
``/mnt/store`` — the same objects ``k8s/base`` and its overlays create. See ``docs/cluster.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "ghcr.io/interplab/interplab:0.1.0"
SPEC_MOUNT = "/etc/interplab/spec"
STORE_MOUNT = "/mnt/store"
STORE_CONFIGMAP = "interplab-store"
S3_SECRET = "interplab-s3"
STORE_PVC = "interplab-store"


@dataclass(frozen=True)
class RenderOptions:
    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    store_backend: str = "pvc"  # "pvc" (shared volume) or "s3" (credentials from a Secret)
    gpus_per_worker: int = 1
    min_workers: int = 0
    max_workers: int = 4
    worker_cpus: str = "8"
    worker_memory: str = "32Gi"
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 86400


def k8s_name(text: str, prefix: str = "interplab-") -> str:
    """A DNS-1123 name (lower case, ≤ 63 chars) from a run id."""
    name = re.sub(r"[^a-z0-9-]+", "-", (prefix + text).lower()).strip("-")
    return name[:63].rstrip("-")


def store_env() -> list[dict[str, Any]]:
    return [
        {"configMapRef": {"name": STORE_CONFIGMAP}},
        {"secretRef": {"name": S3_SECRET, "optional": True}},
    ]


def _container(name: str, image: str, resources: dict[str, Any], mounts: list[dict[str, Any]], ports=None) -> dict:
    out: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "envFrom": store_env(),
        "env": [{"name": "INTERPLAB_CACHE", "value": "/home/ray/.cache/interplab"}],
        "resources": resources,
    }
    if ports:
        out["ports"] = ports
    if mounts:
        out["volumeMounts"] = mounts
    return out


def cluster_spec(opts: RenderOptions, *, spec_configmap: str | None = None) -> dict[str, Any]:
    """The ``rayClusterSpec`` of a RayJob (head without GPUs, one autoscaled GPU worker group)."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if opts.store_backend == "pvc":
        volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": STORE_PVC}})
        mounts.append({"name": "store", "mountPath": STORE_MOUNT})
    head_volumes, head_mounts = list(volumes), list(mounts)
    if spec_configmap:
        head_volumes.append({"name": "spec", "configMap": {"name": spec_configmap}})
        head_mounts.append({"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True})
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    head_resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}
    gpu = {"nvidia.com/gpu": str(opts.gpus_per_worker)} if opts.gpus_per_worker else {}
    worker_resources = {
        "requests": {"cpu": opts.worker_cpus, "memory": opts.worker_memory, **gpu},
        "limits": {"cpu": opts.worker_cpus, "memory": opts.worker_memory, **gpu},
    }
    head_pod: dict[str, Any] = {"containers": [_container("ray-head", opts.image, head_resources, head_mounts, ports)]}
    if head_volumes:
        head_pod["volumes"] = head_volumes
    worker_pod: dict[str, Any] = {"containers": [_container("ray-worker", opts.image, worker_resources, mounts)]}
    if volumes:
        worker_pod["volumes"] = volumes
    if opts.gpus_per_worker:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"spec": head_pod},
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu" if opts.gpus_per_worker else "cpu",
                "replicas": opts.min_workers,
                "minReplicas": opts.min_workers,
                "maxReplicas": opts.max_workers,
                "rayStartParams": {},
                "template": {"spec": worker_pod},
            }
        ],
    }


def render_rayjob(record: dict[str, Any], *, run_id: str, opts: RenderOptions = RenderOptions()) -> list[dict[str, Any]]:
    """The ConfigMap (spec) and RayJob for a resolved spec ``record``; returns the two objects."""
    if opts.store_backend not in ("pvc", "s3"):
        raise ValueError(f"store backend must be 'pvc' or 's3', got {opts.store_backend!r}")
    name = k8s_name(run_id)
    labels = {
        "app.kubernetes.io/name": "interplab",
        "app.kubernetes.io/component": "job",
        "interplab.dev/run-id": run_id[:63],
        "interplab.dev/kind": str(record.get("kind")),
    }
    meta = {"name": name, "labels": labels}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-spec"},
        "data": {"spec.yaml": yaml.safe_dump(record, sort_keys=False)},
    }
    entrypoint = f"python -m interplab.jobs run {SPEC_MOUNT}/spec.yaml --run-id {run_id} --no-progress"
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
            "activeDeadlineSeconds": opts.active_deadline_seconds,
            "backoffLimit": opts.backoff_limit,
            "rayClusterSpec": cluster_spec(opts, spec_configmap=f"{name}-spec"),
        },
    }
    return [configmap, rayjob]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded spec) as ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_all(docs: list[dict[str, Any]], header: str = "") -> str:
    text = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return (header + text) if header else text
