"""Placement groups for a society, failing fast and clearly when the cluster cannot hold it."""

from __future__ import annotations

import logging
from collections import Counter

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested actors; the message says what was asked and what exists."""


def _fmt(resources: dict[str, float]) -> str:
    """CPU, GPU and custom resources; memory figures and per-node markers are noise here."""
    skip = ("memory", "object_store_memory")
    shown = {k: v for k, v in sorted(resources.items())
             if k not in skip and not k.startswith(("node:", "accelerator_type:"))}
    return ", ".join(f"{k}={v:g}" for k, v in shown.items()) or "nothing"


def place(bundles: list[dict[str, float]], strategy: str = "PACK", timeout_s: float = 60.0,
          name: str = "") -> PlacementGroup:
    """Reserve one bundle per actor. Raise PlacementError at once if the cluster is too small in
    total, or after ``timeout_s`` if the bundles cannot be placed (e.g. held by other jobs)."""
    bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
    need: Counter = Counter()
    for b in bundles:
        need.update(b)
    have = ray.cluster_resources()
    short = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        raise PlacementError(
            f"{name or 'society'} needs {_fmt(dict(need))} in {len(bundles)} bundles, but the whole cluster "
            f"has {_fmt(have)}; short of {_fmt(short)}. Lower resources.num_*_per_agent, enable "
            "resources.share_engine, or add nodes."
        )
    pg = placement_group(bundles, strategy=strategy, name=name)
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
