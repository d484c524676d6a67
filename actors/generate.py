"""Driver-side helper: some society members answer given conversations, outside any debate.

Used by STaR's rationalization pass. The society is placed and loaded exactly as for a debate
(``SocietyActors``: same placement group, engine sharing and load checks), asked once per member through
``AgentActor.generate``, then released.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import ray

from actors.society import SocietyActors
from mft_ray.config import Config
from mft_ray.engines import Conversation, SamplingParams
from mft_ray.society import Member

logger = logging.getLogger(__name__)


def generate_with_society(config: Config, model_paths: dict[Member, str] | None,
                          requests: Mapping[str, Sequence[Conversation]], seed_parts: Sequence[object],
                          name: str = "society-generate") -> dict[str, list[str]]:
    """Member name -> one reply per conversation in ``requests[member]``, in order.

    Each member's call is seeded by (sampling.seed, *seed_parts, member), so a rerun reproduces it.
    Members without conversations get an empty list and no call.
    """
    wanted = {m: list(c) for m, c in requests.items() if c}
    if not wanted:
        return {m: [] for m in requests}
    society = SocietyActors(config, model_paths, name=name)
    try:
        unknown = sorted(set(wanted) - set(society.routes))
        if unknown:
            raise ValueError(f"no such society member(s): {unknown}; members: {sorted(society.routes)}")
        base = SamplingParams.from_config(config.sampling)
        refs = {m: society.routes[m].generate.remote(convs, base.derive(*seed_parts, m)) for m, convs in wanted.items()}
        logger.info("%s: %d conversations for %s", name, sum(map(len, wanted.values())), ", ".join(wanted))
        replies = {m: ray.get(ref) for m, ref in refs.items()}
    finally:
        society.shutdown()
    return {m: replies.get(m, []) for m in requests}
