"""Placement of one replica's tensor/pipeline-parallel workers on Ray nodes.

Each pipeline stage's TP group goes on a single node (its all-reduces stay inside the node);
stages go to different nodes while there are unused nodes that fit them. A layout that no node
or the whole cluster can ever hold fails at once; one that only waits for busy resources fails
after a bounded wait. On a cluster that adds nodes on demand (Ray's autoscaler) nothing is refused
up front and no stage is pinned to a node: each stage's group waits, up to the same bound, for
whichever node fits it, one the autoscaler adds included.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import NODE_ID_LABEL_KEY, PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The workers cannot be placed on this cluster (now or ever); the message says why."""


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    ip: str
    resources: dict[str, float]  # total, not currently free

    def fits(self, demand: dict[str, float], count: int) -> bool:
        return all(self.resources.get(name, 0.0) >= amount * count for name, amount in demand.items())


def alive_nodes() -> list[NodeCapacity]:
    return [NodeCapacity(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]


def plan_stages(nodes: list[NodeCapacity], tp: int, pp: int, per_worker: dict[str, float]) -> list[NodeCapacity]:
    """The node of each stage: one that fits a whole TP group, a fresh node while one fits."""
    capable = [n for n in nodes if n.fits(per_worker, tp)]
    if not capable:
        raise PlacementError(
            f"no node can hold a tensor-parallel group of {tp} workers needing {per_worker} each; "
            f"nodes have {[{name: n.resources.get(name, 0.0) for name in per_worker} for n in nodes]}"
        )
    total = {name: sum(n.resources.get(name, 0.0) for n in nodes) for name in per_worker}
    if any(total[name] < amount * tp * pp for name, amount in per_worker.items()):
        raise PlacementError(f"{tp * pp} workers needing {per_worker} each exceed the whole cluster's {total}")
    plan: list[NodeCapacity] = []
    for stage in range(pp):
        unused = [n for n in capable if n not in plan]
        plan.append(unused[0] if unused else capable[stage % len(capable)])
    return plan


@dataclass
class Placement:
    """Where each global rank runs: rank = stage * tp + tp_rank."""

    groups: list[PlacementGroup]
    strategies: list[PlacementGroupSchedulingStrategy]
    node_ids: list[str]

    def release(self) -> None:
        for group in self.groups:
            remove_placement_group(group)


def place_workers(tp: int, pp: int, per_worker: dict[str, float], timeout_s: float, autoscaling: bool = False) -> Placement:
    """Reserve one placement group per stage (all its bundles on one node) and wait for it; `autoscaling`:
    the cluster adds nodes on demand, so the groups are not pinned to the nodes there are now."""
    bundles = [dict(per_worker) for _ in range(tp)]
    if autoscaling:
        groups = [placement_group(bundles, strategy="STRICT_PACK") for _ in range(pp)]
    else:
        plan = plan_stages(alive_nodes(), tp, pp, per_worker)
        groups = [
            placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=[{NODE_ID_LABEL_KEY: node.node_id} for _ in range(tp)])
            for node in plan
        ]
    try:
        ray.get([g.ready() for g in groups], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        for group in groups:
            remove_placement_group(group)
        waited_for = "add nodes or free room" if autoscaling else "free room"
        raise PlacementError(
            f"the cluster did not {waited_for} for {tp * pp} workers needing {per_worker} each within {timeout_s:.0f} s"
        ) from None
    strategies = [
        PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i) for group in groups for i in range(tp)
    ]
    node_ids = [ray.util.placement_group_table(group)["bundles_to_node_id"][0] for group in groups]
    return Placement(groups, strategies, [node_id for node_id in node_ids for _ in range(tp)])
