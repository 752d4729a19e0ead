"""What Ray Serve's own metrics say about a served model, for ``interplab serve status``.

Ray exports Serve's metrics in Prometheus format on every node (``MetricsExportPort`` of
``ray.nodes()``; the same endpoint a Prometheus server scrapes). :func:`serve_metrics` reads them for
one application: per replica, the HTTP requests answered, their mean processing latency, the requests being
processed and whether it is healthy; for the application, the requests queued in the proxies' and
handles' routers and the replicas started so far. Ray exports every few seconds, so the numbers lag
by up to that much. What Serve does not measure (operations, per-user requests, batch sizes, the
queue inside each replica) every replica exports as ``interplab_serve_*`` metrics
(:mod:`interplab.serve.export`); they are summed over replicas here too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

PREFIX = "ray_serve_"
OWN = "interplab_serve_"  # the replicas' own counters (interplab.serve.export)


def _scrape(url: str, timeout_s: float) -> str:
    import httpx

    return httpx.get(url, timeout=timeout_s).text


def serve_metrics(app: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ray Serve's metrics of application ``app``, summed over the cluster's nodes (see the module docstring)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    replicas: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    totals: dict[str, float] = defaultdict(float)
    own: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # interplab_serve_* by what, tag
    read, unreachable = 0, []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = _scrape(url, timeout_s)
        except Exception as exc:  # noqa: BLE001 - one node's exporter down: report it, read the others
            unreachable.append(f"{url}: {type(exc).__name__}")
            continue
        read += 1
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("application") != app:
                    continue
                if OWN in sample.name and sample.name.endswith("_total"):  # our counters (any exporter prefix)
                    what = sample.name.split(OWN, 1)[1].removesuffix("_total")
                    tag = labels.get({"requests": "op", "user_requests": "user", "batches": "size"}.get(what, ""), "")
                    own[what][tag] += float(sample.value)
                    continue
                if OWN + "queue_depth" in sample.name:
                    own["queue_depth"][labels.get("replica", "")] = float(sample.value)
                    continue
                if not sample.name.startswith(PREFIX):
                    continue
                name, value, replica = sample.name[len(PREFIX) :], float(sample.value), labels.get("replica")
                http = str(labels.get("route", "")).startswith("/")  # not a handle call (status's own counters)
                if name == "deployment_request_counter_total" and replica and http:
                    replicas[replica]["requests"] += value
                elif name == "deployment_processing_latency_ms_sum" and replica and http:
                    replicas[replica]["latency_ms_sum"] += value
                elif name == "deployment_processing_latency_ms_count" and replica and http:
                    replicas[replica]["latency_count"] += value
                elif name == "replica_processing_queries" and replica:
                    replicas[replica]["processing"] += value
                elif name == "deployment_replica_healthy" and replica:
                    replicas[replica]["healthy"] = value
                elif name == "deployment_replica_starts_total":
                    totals["replica_starts"] += value
                elif name == "deployment_queued_queries":
                    totals["queued"] += value
                elif name == "num_ongoing_requests_at_replicas":
                    totals["ongoing"] += value
    per_replica = {
        rid: {
            "requests": int(r["requests"]),
            "processing": int(r["processing"]),
            "healthy": bool(r.get("healthy", 0.0)),
            "mean_latency_ms": round(r["latency_ms_sum"] / r["latency_count"], 2) if r["latency_count"] else None,
        }
        for rid, r in sorted(replicas.items())
    }
    return {
        "source": "Ray Serve metrics (Prometheus export of each node)",
        "nodes_read": read,
        "unreachable": unreachable,
        "requests": sum(r["requests"] for r in per_replica.values()),
        "queued": int(totals["queued"]),
        "ongoing": int(totals["ongoing"]),
        "replica_starts": int(totals["replica_starts"]),
        "replicas": per_replica,
        "operations": {k: int(v) for k, v in sorted(own["requests"].items())},
        "per_user": {k: int(v) for k, v in sorted(own["user_requests"].items())},
        "batch_sizes": {k: int(v) for k, v in sorted(own["batches"].items(), key=lambda kv: int(kv[0] or 0))},
        "queue_depth": int(sum(own["queue_depth"].values())),
    }
