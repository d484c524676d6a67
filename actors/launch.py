"""Driver-side helpers: run one debate over a split with a fresh society, then release it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import ray

from actors.coordinator import DebateCoordinator
from actors.society import SocietyActors
from mft_ray.config import Config
from mft_ray.records import shard_is_complete, split_shards
from mft_ray.society import Member
from mft_ray.tasks import Problem

logger = logging.getLogger(__name__)


def all_shards_complete(config: Config, problems: Sequence[Problem], out_dir: str | Path) -> bool:
    return all(shard_is_complete(out_dir, k, [p.id for p in shard])
               for k, shard in enumerate(split_shards(problems, config.debate.shard_size)))


def debate_split(config: Config, iteration: int, split: str, problems: Sequence[Problem],
                 out_dir: str | Path, model_paths: dict[Member, str] | None = None) -> dict[str, Any]:
    """Debate ``problems`` with a society (placed, loaded, then released) and write records to ``out_dir``.

    Only ids and question texts reach the actors: ground-truth answers never leave the driver.
    """
    if all_shards_complete(config, problems, out_dir):
        logger.info("debate %s iter %d: all shards already complete in %s", split, iteration, out_dir)
        return {"split": split, "iteration": iteration, "problems": len(problems), "skipped_all": True}
    society = SocietyActors(config, model_paths, name=f"society-iter{iteration}-{split}")
    coordinator = None
    try:
        coordinator = DebateCoordinator.remote(config.to_dict(), society.routes)
        payload = [(p.id, p.question) for p in problems]
        return ray.get(coordinator.run.remote(iteration, split, payload, str(out_dir)))
    finally:
        if coordinator is not None:
            ray.kill(coordinator)
        society.shutdown()
