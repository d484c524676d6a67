"""Pure debate logic: which messages each agent sees in each round (Algorithm 1 lines 5-16).

Both the Ray coordinator and the sequential reference loop build conversations with these functions,
so the distributed run and the authors'-style loop are the same method by construction.

Agent indices are passed along so that a ``unique_id`` prompt style can address each agent by its ID
and label the other agents' responses with theirs; the default style ignores them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import total_ordering

from mft_ray.engines.base import Conversation
from mft_ray.society.members import CRITIC, GENERATOR, SUMMARIZER
from mft_ray.society.prompts import PromptSet, agent_id

# Within a round, the order the roles run: round 1 is the generators'; in each round m > 1 the summarizer
# condenses round m-1 before the critics answer.
_ROLE_RANK = {GENERATOR: 0, SUMMARIZER: 1, CRITIC: 2}


@total_ordering
@dataclass(frozen=True)
class Turn:
    """One step of a debate: every agent's ``role`` turn in round ``round`` (1-based).

    The coordinator keys a debate's ObjectRefs by Turn: (1, generator), then for m = 2..M
    (m, summarizer) unless summaries are off, and (m, critic). Turns sort in the order they run, by
    round and then generator < summarizer < critic, so ``max(turns)`` is the final turn, the one voted
    on. ``str(turn)`` is "<round>/<role>", for logs.
    """

    round: int
    role: str

    def __post_init__(self) -> None:
        if self.role not in _ROLE_RANK:
            raise ValueError(f"a debate turn's role is one of {list(_ROLE_RANK)}, got {self.role!r}")

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Turn):
            return NotImplemented
        return (self.round, _ROLE_RANK[self.role]) < (other.round, _ROLE_RANK[other.role])

    def __str__(self) -> str:
        return f"{self.round}/{self.role}"


@dataclass
class TurnBatch:
    """One agent's turn over a batch of problems: the conversations it was given and its replies."""

    messages: list[Conversation]
    responses: list[str]

    def conversation_so_far(self, i: int) -> Conversation:
        """Problem i's conversation including this turn's reply."""
        return [*self.messages[i], {"role": "assistant", "content": self.responses[i]}]


def round1_messages(questions: Sequence[str], prompts: PromptSet, agent: int | None = None) -> list[Conversation]:
    """y[1,n] = A^G_n(prompt0(x)) for every problem x (``agent`` = n, used by the unique-ID style)."""
    return [[{"role": "user", "content": prompts.question(q, agent)}] for q in questions]


# For problem i, the other agents' indices in the order agent n sees their responses (None: agent order).
Orders = Sequence[Sequence[int]] | None


def others_order(seed: int, problem_id: str, round_: int, agent: int, n_agents: int) -> list[int]:
    """The agents other than ``agent``, shuffled, in the order ``agent`` sees them in round ``round_``.

    The authors' code shuffles the other agents' responses before summarizing or concatenating them; in a
    fixed order the response listed last sways the summary and the critics most. Seeded by (seed, problem,
    round, agent), so that a rerun or a resumed shard shows the same order, and the summary for agent n
    and agent n's critique list the others alike.
    """
    others = [k for k in range(n_agents) if k != agent]
    blob = f"others:{seed}:{problem_id}:{round_}:{agent}".encode()
    random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")).shuffle(others)
    return others


def _order(previous: Sequence[TurnBatch], agent: int, order: Sequence[int] | None) -> list[int]:
    if order is None:
        return [k for k in range(len(previous)) if k != agent]
    if sorted(order) != [k for k in range(len(previous)) if k != agent]:
        raise ValueError(f"an order of the agents other than {agent} among {len(previous)}, got {list(order)}")
    return list(order)


def others_of(previous: Sequence[TurnBatch], agent: int, i: int, order: Sequence[int] | None = None) -> list[str]:
    """The previous-round responses to problem i of every agent except ``agent`` (in ``order`` if given)."""
    return [previous[k].responses[i] for k in _order(previous, agent, order)]


def other_names(previous: Sequence[TurnBatch], agent: int, i: int, order: Sequence[int] | None = None) -> list[str]:
    """Unique IDs of the agents behind ``others_of(previous, agent, i, order)``, in the same order.

    A round-1 turn (a conversation of one prompt) came from a generator, GEN<n+1>; any later turn from
    a critic, CRIT<n+1>.
    """
    return [agent_id("generator" if len(previous[k].messages[i]) == 1 else "critic", k)
            for k in _order(previous, agent, order)]


def _names(prompts: PromptSet, previous: Sequence[TurnBatch], agent: int, i: int,
           order: Sequence[int] | None) -> list[str] | None:
    return other_names(previous, agent, i, order) if prompts.style == "unique_id" else None


def summary_messages(questions: Sequence[str], previous: Sequence[TurnBatch], agent: int,
                     prompts: PromptSet, orders: Orders = None) -> list[Conversation]:
    """Summarizer prompts for s[m,agent], built only from round m-1 responses of the other agents.

    ``orders[i]`` lists the other agents for problem i in the order to show them (``others_order``).
    """
    return [
        [{"role": "user", "content": prompts.summary(q, others_of(previous, agent, i, _at(orders, i)),
                                                     _names(prompts, previous, agent, i, _at(orders, i)))}]
        for i, q in enumerate(questions)
    ]


def concatenated_contexts(questions: Sequence[str], previous: Sequence[TurnBatch], agent: int,
                          prompts: PromptSet, orders: Orders = None) -> list[str]:
    """The "w/o summary" context for ``agent``: the other round m-1 responses concatenated."""
    return [prompts.concatenate(others_of(previous, agent, i, _at(orders, i)),
                                _names(prompts, previous, agent, i, _at(orders, i)))
            for i in range(len(questions))]


def _at(orders: Orders, i: int) -> Sequence[int] | None:
    return None if orders is None else orders[i]


def critic_messages(own_previous: TurnBatch, contexts: Sequence[str], prompts: PromptSet,
                    summarized: bool, agent: int | None = None) -> list[Conversation]:
    """Agent n's conversation so far plus critic_prompt(x, s[m,n]) (``agent`` = n, for unique IDs)."""
    return [
        [*own_previous.conversation_so_far(i),
         {"role": "user", "content": prompts.critique(c, summarized, agent)}]
        for i, c in enumerate(contexts)
    ]
