"""Placement groups for a society, failing fast and clearly when the cluster cannot hold it."""

from __future__ import annotations

import logging
import re
from collections import Counter

import ray
from ray._private.state import available_resources_per_node  # the only per-node reading of free resources
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from mft_ray.errors import PlacementError

logger = logging.getLogger(__name__)


def _fmt(resources: dict[str, float]) -> str:
    """CPU, GPU and custom resources; memory figures and per-node markers are noise here."""
    skip = ("memory", "object_store_memory")
    shown = {k: v for k, v in sorted(resources.items())
             if k not in skip and not k.startswith(("node:", "accelerator_type:"))}
    return ", ".join(f"{k}={v:g}" for k, v in shown.items()) or "nothing"


def unmet(bundles: list[dict[str, float]], total: dict[str, float],
          nodes: list[dict[str, float]] | None = None) -> str | None:
    """Why ``bundles`` can never be placed on a cluster with ``total`` resources and these ``nodes``
    (each node's resources), or None if they might be. Pure: the caller passes what Ray reports.

    Two reasons: the bundles together ask for more than the whole cluster has, or one bundle asks
    for more than any single node has (a bundle never spans nodes).
    """
    bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
    need: Counter = Counter()
    for b in bundles:
        need.update(b)
    short = {k: v - total.get(k, 0.0) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if short:
        return (f"needs {_fmt(dict(need))} in {len(bundles)} bundles, but the whole cluster has {_fmt(total)}; "
                f"short of {_fmt(short)}")
    if nodes:
        for b in bundles:
            if not any(all(v <= node.get(k, 0.0) + 1e-9 for k, v in b.items()) for node in nodes):
                largest = max(nodes, key=lambda node: tuple(node.get(k, 0.0) for k in sorted(b)))
                return (f"needs bundles of {_fmt(b)}, but no node has that much (largest: {_fmt(largest)}; "
                        f"{len(nodes)} node(s))")
    return None


# Ray names the resources of a placed group "<resource>_group_[<bundle>_]<group id>": they are the
# same CPUs and GPUs again, so an error that says what the cluster has must leave them out.
_GROUP_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")


def physical(resources: dict[str, float]) -> dict[str, float]:
    """``resources`` without the per-placement-group copies Ray adds while groups exist."""
    return {k: v for k, v in resources.items() if not _GROUP_RESOURCE.search(k)}


def free_cpus_per_node() -> list[float]:
    """The CPUs free now on each alive node. Ray's per-node reading is ``ray._private.state``'s (no public
    API gives it); a worker must fit on one node, so the cluster's summed free CPUs would overstate it."""
    return [float(r.get("CPU", 0.0)) for r in available_resources_per_node().values()]


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster (placement-group copies left out)."""
    return [physical(dict(n.get("Resources", {}))) for n in ray.nodes() if n.get("Alive")]


def place(bundles: list[dict[str, float]], strategy: str = "PACK", timeout_s: float = 60.0,
          name: str = "", lifetime: str | None = None) -> PlacementGroup:
    """Reserve one bundle per actor. Raise PlacementError at once if the cluster is too small (in total
    or for one bundle), or after ``timeout_s`` if the bundles cannot be placed (e.g. held by other jobs).
    ``lifetime="detached"`` keeps the group after the creating driver exits (the interactive service)."""
    bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
    need: Counter = Counter()
    for b in bundles:
        need.update(b)
    have = physical(ray.cluster_resources())
    why = unmet(bundles, have, alive_node_resources())
    if why:
        raise PlacementError(
            f"{name or 'society'} {why}. Lower resources.num_*_per_agent, enable "
            "resources.share_engine, or add nodes."
        )
    pg = placement_group(bundles, strategy=strategy, name=name, lifetime=lifetime)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"{name or 'society'} could not be placed within {timeout_s:g}s: it needs {_fmt(dict(need))} "
            f"({len(bundles)} bundles, strategy {strategy}); the cluster has {_fmt(have)} in total and "
            f"{_fmt(ray.available_resources())} free. Other jobs may hold the rest."
        ) from None
    logger.info("placed %s: %d bundles, %s", name or "society", len(bundles), _fmt(dict(need)))
    return pg
