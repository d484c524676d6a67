"""Pure debate logic: which messages each agent sees in each round (Algorithm 1 lines 5-16).

Both the Ray coordinator and the sequential reference loop build conversations with these functions,
so the distributed run and the authors'-style loop are the same method by construction.

Agent indices are passed along so that a ``unique_id`` prompt style can address each agent by its ID
and label the other agents' responses with theirs; the default style ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from typing import Sequence

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


def others_of(previous: Sequence[TurnBatch], agent: int, i: int) -> list[str]:
    """The previous-round responses to problem i of every agent except ``agent``."""
    return [batch.responses[i] for n, batch in enumerate(previous) if n != agent]


def other_names(previous: Sequence[TurnBatch], agent: int, i: int) -> list[str]:
    """Unique IDs of the agents behind ``others_of(previous, agent, i)``, in the same order.

    A round-1 turn (a conversation of one prompt) came from a generator, GEN<n+1>; any later turn from
    a critic, CRIT<n+1>.
    """
    return [agent_id("generator" if len(batch.messages[i]) == 1 else "critic", n)
            for n, batch in enumerate(previous) if n != agent]


def _names(prompts: PromptSet, previous: Sequence[TurnBatch], agent: int, i: int) -> list[str] | None:
    return other_names(previous, agent, i) if prompts.style == "unique_id" else None


def summary_messages(questions: Sequence[str], previous: Sequence[TurnBatch], agent: int,
                     prompts: PromptSet) -> list[Conversation]:
    """Summarizer prompts for s[m,agent], built only from round m-1 responses of the other agents."""
    return [
        [{"role": "user", "content": prompts.summary(q, others_of(previous, agent, i),
                                                     _names(prompts, previous, agent, i))}]
        for i, q in enumerate(questions)
    ]


def concatenated_contexts(questions: Sequence[str], previous: Sequence[TurnBatch], agent: int,
                          prompts: PromptSet) -> list[str]:
    """The "w/o summary" context for ``agent``: the other round m-1 responses concatenated."""
    return [prompts.concatenate(others_of(previous, agent, i), _names(prompts, previous, agent, i))
            for i in range(len(questions))]


def critic_messages(own_previous: TurnBatch, contexts: Sequence[str], prompts: PromptSet,
                    summarized: bool, agent: int | None = None) -> list[Conversation]:
    """Agent n's conversation so far plus critic_prompt(x, s[m,n]) (``agent`` = n, for unique IDs)."""
    return [
        [*own_previous.conversation_so_far(i),
         {"role": "user", "content": prompts.critique(c, summarized, agent)}]
        for i, c in enumerate(contexts)
    ]
