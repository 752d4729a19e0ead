"""The replica's own counters as Ray metrics, so that ``interplab serve status`` sums them over replicas.

Each replica keeps its counters in its :class:`~interplab.serve.server.Server` (operations answered,
requests per user, batch sizes). After every answer, :class:`CounterExport` adds what changed since
its last call to Ray metrics tagged with the application (and user, operation or batch size). Ray
exports them in Prometheus format on every node with Serve's own metrics, where
:func:`interplab.serve.status.serve_metrics` reads and sums them: totals over every replica, with
the same few seconds of lag as Serve's metrics.
"""

from __future__ import annotations

from typing import Any

METRIC_PREFIX = "interplab_serve_"


class CounterExport:
    """Ray counters fed with the increments of one replica's :meth:`Server.counters`."""

    def __init__(self, application: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.application = application
        self.ops = Counter(f"{METRIC_PREFIX}requests", "requests answered, by operation", tag_keys=("application", "op"))
        self.users = Counter(f"{METRIC_PREFIX}user_requests", "run requests batched, by user", tag_keys=("application", "user"))
        self.batches = Counter(
            f"{METRIC_PREFIX}batches", "forward passes run, by requests merged", tag_keys=("application", "size")
        )
        self.depth = Gauge(
            f"{METRIC_PREFIX}queue_depth", "requests waiting in a replica's queue", tag_keys=("application", "replica")
        )
        self.seen: dict[tuple[str, str], float] = {}

    def update(self, stats: dict[str, Any], replica: str) -> None:
        batching = stats["batching"]
        for op, n in stats["requests"].items():
            self._add(self.ops, "op", op, n)
        for user, n in batching["per_user"].items():
            self._add(self.users, "user", user, n)
        for size, n in batching["batch_sizes"].items():
            self._add(self.batches, "size", str(size), n)
        self.depth.set(stats["queue_depth"], tags={"application": self.application, "replica": replica})

    def _add(self, counter: Any, key: str, value: str, total: float) -> None:
        delta = total - self.seen.get((key, value), 0.0)
        if delta > 0:
            counter.inc(delta, tags={"application": self.application, key: value})
            self.seen[(key, value)] = total
