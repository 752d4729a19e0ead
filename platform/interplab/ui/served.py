"""Served models (:mod:`interplab.serve.deployment`): which are up, their replicas and queue depths.

The dashboard joins the Ray cluster given as ``--ray-address`` once, on first use, and asks Serve;
with no address, or when the cluster, Serve or a replica does not answer, the page says why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

STATS_TIMEOUT_S = 5.0


@dataclass
class ServedModels:
    ray_address: str | None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self) -> dict[str, Any]:
        """``{"available": bool, "reason": str, "models": [...]}``; never raises."""
        if not self.ray_address:
            return {"available": False, "reason": "no service: no Ray cluster configured (--ray-address HEAD:6379)", "models": []}
        try:
            self._join()
            from interplab.serve.deployment import served, stats

            apps = served()
        except Exception as exc:  # noqa: BLE001 - any failure means "no service", with its reason
            return {"available": False, "reason": f"no service: {type(exc).__name__}: {str(exc)[:300]}", "models": []}
        models = []
        for name, info in sorted(apps.items()):
            entry: dict[str, Any] = {"name": name, **info, "stats": None, "stats_error": None}
            if info["status"] == "RUNNING":
                try:
                    entry["stats"] = stats(name, timeout_s=STATS_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - the row still shows what Serve knows
                    entry["stats_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            models.append(entry)
        reason = "" if models else "no service: no models are served on this cluster"
        return {"available": bool(models), "reason": reason, "models": models}

    def _join(self) -> None:
        import ray

        with self._lock:
            if not ray.is_initialized():
                ray.init(address=self.ray_address, logging_level=logging.ERROR, log_to_driver=False)
