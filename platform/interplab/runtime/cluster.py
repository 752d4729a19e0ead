"""Ray plumbing: start or join a cluster, place a replica's stage actors, tell retryable failures apart.

Placement says what it waits for: a replica's bundles (one per stage, packed onto as few nodes as
possible) that the cluster can never hold — its nodes' total resources, less what this job already
holds, are too small and no autoscaler can add nodes — fail at once with :class:`PlacementError`;
bundles that could fit later are waited for up to ``parallel.placement_timeout_s``, with a warning
after :data:`REPORT_AFTER_S` naming the bundles wanted and each node's total and free resources
(the job driver prints the same line from the cluster's placement group table,
:func:`waiting_placements`).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from interplab.runtime.config import DEFAULT_PLACEMENT_TIMEOUT_S
from interplab.runtime.errors import StageError
from interplab.runtime.stage import StageSpec, stage_actor_class

log = logging.getLogger(__name__)

REPORT_AFTER_S = 5.0  # a placement still waiting this long says what it waits for
REPORT_EVERY_S = 60.0  # and says it again this often
PLACEMENT_PREFIX = "interplab"  # placement group names: interplab/<job id>/replica-<i>/<unique>
_EPS = 1e-6  # Ray keeps resources to 1e-4


class PlacementError(RuntimeError):
    """A replica's stage bundles cannot be placed: never on this cluster, or not within the timeout."""


def ensure_ray() -> None:
    """Join the running Ray cluster, or start a local one (6–10 s on a small machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


@dataclass
class Replica:
    """One copy of the pipeline: a placement group and one actor per stage."""

    index: int
    specs: list[StageSpec]
    actors: list[Any]
    placement_group: Any
    one_node: bool = False  # every stage's bundle is on the same node (so CPU stages share its cores)

    @property
    def last(self):
        return self.actors[-1]


def create_replica(
    index: int, specs: list[StageSpec], cpus: float, gpus: float, timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S
) -> Replica:
    """Reserve one bundle per stage (packed onto as few nodes as possible) and start the stage actors.

    Raises :class:`PlacementError` at once when the cluster can never hold the bundles, or after
    ``timeout_s`` (``parallel.placement_timeout_s``) when they did not become free; see the module
    docstring. Actors restart automatically when they die (``max_restarts=-1``, reloading their
    weights); tasks are not retried by Ray (``max_task_retries=0``): the pipeline resubmits whole
    micro-batches, because a stage's kept autograd graph and a chunk's downstream writes go with the
    dead process.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    group = place_bundles(index, bundle, len(specs), timeout_s)
    actor_class = stage_actor_class()
    actors = [
        actor_class.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i),
        ).remote(spec)
        for i, spec in enumerate(specs)
    ]
    nodes = ray.util.placement_group_table(group).get("bundles_to_node_id", {})
    replica = Replica(index, specs, actors, group, one_node=len(set(nodes.values())) == 1)
    wait_alive(replica, timeout_s)
    return replica


# -- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeResources:
    """One alive node: its total and free resources, and what this job holds there and keeps
    holding while it waits (this process's own resources, the job's placement groups already placed)."""

    node_id: str
    total: Mapping[str, float]
    free: Mapping[str, float] | None  # None when Ray does not say
    held: Mapping[str, float] = field(default_factory=dict)

    def usable(self) -> dict[str, float]:
        """What the node could ever give this job's next placement group."""
        return {k: v - self.held.get(k, 0.0) for k, v in self.total.items()}


def place_bundles(index: int, bundle: dict[str, float], count: int, timeout_s: float):
    """A placement group of ``count`` copies of ``bundle`` (PACK), once Ray has reserved it.

    Fails fast when it can never fit (:func:`check_placeable`), warns while it waits, gives up after
    ``timeout_s`` (removing the group)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_placeable(index, bundle, count, cluster_nodes())
    job = ray.get_runtime_context().get_job_id()
    name = f"{PLACEMENT_PREFIX}/{job}/replica-{index}/{uuid.uuid4().hex[:8]}"
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK", name=name)
    started = time.monotonic()
    report_at = started + REPORT_AFTER_S
    try:
        while not group.wait(max(0.1, min(1.0, started + timeout_s - time.monotonic()))):
            nodes = cluster_nodes()
            check_placeable(index, bundle, count, nodes)  # a node may have left meanwhile
            now = time.monotonic()
            if now - started >= timeout_s:
                raise PlacementError(
                    f"replica {index}: not placed within {timeout_s:g} s (parallel.placement_timeout_s): "
                    f"{describe_placement(bundle, count, nodes)}; lower stages, cpus_per_stage or gpus_per_stage, "
                    "or free the cluster"
                )
            if now >= report_at:
                log.warning(
                    "replica %d: waiting for the cluster to place its stages: %s", index, describe_placement(bundle, count, nodes)
                )
                report_at = now + REPORT_EVERY_S
    except BaseException:
        remove_placement_group(group)
        raise
    return group


def check_placeable(index: int, bundle: Mapping[str, float], count: int, nodes: list[NodeResources]) -> None:
    """Raise :class:`PlacementError` when ``count`` bundles can never be placed: they do not fit in
    the nodes' resources less what this job holds, and no autoscaler can add nodes."""
    if bundles_fit(bundle, count, [n.usable() for n in nodes]) or can_autoscale():
        return
    raise PlacementError(
        f"replica {index}: the cluster can never place its stages and has no autoscaler to add nodes: "
        f"{describe_placement(bundle, count, nodes)}; lower stages, cpus_per_stage or gpus_per_stage "
        "(or the job's resources), or add nodes"
    )


def bundles_fit(bundle: Mapping[str, float], count: int, capacities: list[Mapping[str, float]]) -> bool:
    """True when ``count`` copies of ``bundle`` fit in ``capacities`` (one mapping per node; a bundle
    lies on one node, PACK may spread bundles over nodes)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return True
    room = 0
    for capacity in capacities:
        room += min(math.floor((capacity.get(k, 0.0) + _EPS) / v) for k, v in need.items())
        if room >= count:
            return True
    return False


def can_autoscale() -> bool:
    """True when an autoscaler may add nodes: the cluster config Ray's autoscaler reports (KubeRay,
    ``ray up``) has a node group that can grow (the test Ray Data uses). Unknown counts as yes, so a
    cluster that could grow is never failed early."""
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray: assume it may grow
        return True
    if config is None or not config.node_group_configs:
        return False
    return any(
        g.max_count == -1 or g.max_count > g.min_count for g in config.node_group_configs if g.resources and g.max_count != 0
    )


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes with their total and free resources and what this job holds on each."""
    import ray

    try:
        from ray._private import state

        free = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - free resources are for the message only
        free = {}
    held = _held_by_this_job()
    return [
        NodeResources(n["NodeID"], dict(n.get("Resources", {})), free.get(n["NodeID"]), held.get(n["NodeID"], {}))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _held_by_this_job() -> dict[str, dict[str, float]]:
    """Per node: this process's own resources (an actor's) and the bundles of this job's placed groups."""
    import ray

    context = ray.get_runtime_context()
    held: dict[str, dict[str, float]] = {}

    def add(node: str, resources: Mapping[str, float]) -> None:
        into = held.setdefault(node, {})
        for k, v in resources.items():
            into[k] = into.get(k, 0.0) + float(v)

    if context.worker.mode == ray.WORKER_MODE:
        add(context.get_node_id(), context.get_assigned_resources())
    prefix = f"{PLACEMENT_PREFIX}/{context.get_job_id()}/"
    for group in ray.util.placement_group_table().values():
        if group.get("state") == "CREATED" and str(group.get("name", "")).startswith(prefix):
            for i, resources in group.get("bundles", {}).items():
                add(group["bundles_to_node_id"][i], resources)
    return held


def describe_placement(bundle: Mapping[str, float], count: int, nodes: list[NodeResources], what: str = "bundle(s)") -> str:
    """``3 bundle(s) of {CPU: 1} wanted; 3 node(s): 1a2b3c4d CPU 1 total, 0.9 free ({CPU: 0.1} held by this job); ...``"""
    keys = [k for k in bundle if bundle[k] > 0] or list(bundle)
    parts = []
    for n in nodes:
        text = f"{n.node_id[:8]} " + ", ".join(f"{k} {_num(n.total.get(k, 0.0))} total" for k in keys)
        if n.free is not None:
            text += ", " + ", ".join(f"{_num(n.free.get(k, 0.0))} free" for k in keys)
        held = {k: n.held[k] for k in keys if n.held.get(k)}
        if held:
            text += f" ({_resources(held)} held by this job)"
        parts.append(text)
    return f"{count} {what} of {_resources(bundle)} wanted; {len(nodes)} node(s): " + "; ".join(parts)


def waiting_placements(job_id: str) -> list[str]:
    """One line per placement group of job ``job_id`` still waiting for resources (for the driver)."""
    import ray

    out = []
    nodes = None
    for group in ray.util.placement_group_table().values():
        name = str(group.get("name", ""))
        if group.get("state") not in ("PENDING", "RESCHEDULING") or not name.startswith(f"{PLACEMENT_PREFIX}/{job_id}/"):
            continue
        nodes = nodes if nodes is not None else cluster_nodes()
        bundles = list(group.get("bundles", {}).values())
        what = name.split("/")[2] if name.count("/") >= 2 else name
        out.append(
            f"{what}: waiting for the cluster to place its stages: "
            f"{describe_placement(bundles[0] if bundles else {}, len(bundles), nodes)}"
        )
    return out


def release_placements(job_id: str) -> int:
    """Remove every placement group of job ``job_id`` (returns how many). A group outlives the actor
    that made it (it belongs to the job), so a job that kills its workers releases their stages' groups."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for group in ray.util.placement_group_table().values():
        if group.get("state") != "REMOVED" and str(group.get("name", "")).startswith(f"{PLACEMENT_PREFIX}/{job_id}/"):
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group["placement_group_id"]))))
                removed += 1
            except Exception:  # noqa: BLE001 - removed meanwhile
                pass
    return removed


def _num(value: float) -> str:
    return f"{value:g}"


def _resources(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in resources.items()) + "}"


def wait_alive(replica: Replica, timeout_s: float = 300) -> list[tuple[int, int]]:
    """Block until every stage actor answers ``ping`` (restarted ones have reloaded their weights)."""
    import ray

    deadline = time.monotonic() + timeout_s
    out = []
    for spec, actor in zip(replica.specs, replica.actors):
        while True:
            try:
                out.append(ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic())))
                break
            except ray.exceptions.RayTaskError as exc:
                raise unwrap(exc) from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if getattr(exc, "actor_init_failed", False):
                    cause_type, _, detail = _last_line(str(exc)).partition(": ")
                    raise StageError(
                        spec.index,
                        (spec.start, spec.stop),
                        [],
                        cause_type.rsplit(".", 1)[-1] or "ActorInitError",
                        f"the stage actor failed to start: {detail or cause_type}",
                    ) from None
                if time.monotonic() > deadline:
                    raise StageError(
                        spec.index,
                        (spec.start, spec.stop),
                        [],
                        "ActorDiedError",
                        f"the stage actor did not come back within {timeout_s:.0f} s",
                    ) from None
                time.sleep(0.2)
    return out


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def shutdown_replica(replica: Replica) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for actor in replica.actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        remove_placement_group(replica.placement_group)
    except Exception:  # noqa: BLE001
        pass


def retryable(exc: BaseException) -> bool:
    """True for failures of the machinery (a stage process died, an object was lost), not of the work."""
    import ray

    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
    if isinstance(exc, ray.exceptions.RayTaskError):
        return isinstance(getattr(exc, "cause", None), lost)
    return isinstance(exc, lost)


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing exception for a Ray error: a clean :class:`StageError`, or the error itself."""
    import ray

    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, StageError):
        return StageError(cause.stage, cause.layers, cause.prompt_ids, cause.cause_type, cause.detail, cause.remote_traceback)
    return exc
