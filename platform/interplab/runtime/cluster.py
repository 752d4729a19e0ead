"""Ray plumbing: start or join a cluster, place a replica's stage actors, tell retryable failures apart."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from interplab.runtime.errors import StageError
from interplab.runtime.stage import StageSpec, stage_actor_class


def ensure_ray() -> None:
    """Join the running Ray cluster, or start a local one (6–10 s on a small machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="warning")


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


def create_replica(index: int, specs: list[StageSpec], cpus: float, gpus: float, timeout_s: float = 600) -> Replica:
    """Reserve one bundle per stage (packed onto as few nodes as possible) and start the stage actors.

    Actors restart automatically when they die (``max_restarts=-1``, reloading their weights); tasks
    are not retried by Ray (``max_task_retries=0``): the pipeline resubmits whole micro-batches,
    because a stage's kept autograd graph and a chunk's downstream writes go with the dead process.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    group = placement_group([dict(bundle) for _ in specs], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"replica {index}: could not reserve {len(specs)} bundles of {bundle} in {timeout_s:.0f} s; "
            f"the cluster has {ray.available_resources()} free; lower gpus_per_stage/cpus_per_stage or stages"
        ) from None
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
                        spec.index, (spec.start, spec.stop), [], cause_type.rsplit(".", 1)[-1] or "ActorInitError",
                        f"the stage actor failed to start: {detail or cause_type}",
                    ) from None
                if time.monotonic() > deadline:
                    raise StageError(
                        spec.index, (spec.start, spec.stop), [], "ActorDiedError",
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
