"""The agent actor: one engine serving one or more society members. A member's role is data.

Methods that take a batch for several members return one ``TurnBatch`` per member; callers set
``num_returns`` to the number of members so that each member's output is its own ObjectRef, which the
coordinator hands straight to the next actor (the driver and the coordinator never hold the text).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ray

from mft_ray.config import ModelConfig
from mft_ray.engines import Conversation, Engine, SamplingParams
from mft_ray.engines.factory import make_engine
from mft_ray.errors import EngineError
from mft_ray.models.builtin import resolve_model_path
from mft_ray.society.debate import (
    Orders,
    TurnBatch,
    concatenated_contexts,
    critic_messages,
    round1_messages,
    summary_messages,
)
from mft_ray.society.members import CRITIC, GENERATOR, SUMMARIZER, Member
from mft_ray.society.prompts import PromptSet

logger = logging.getLogger(__name__)


def _unpack(outputs: list[TurnBatch]) -> Any:
    # Ray hands back a single object (not a 1-tuple) when num_returns == 1.
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


# If an agent's process dies (OOM, a killed worker, a lost GPU), Ray restarts it in its placement-group
# bundle (the constructor reloads the weights from disk) and resubmits the calls it had not finished.
# Resubmitting is correct because a call's output depends only on its inputs: every call carries its own
# seed (SamplingParams.derive), so a retried round gives the text the lost one would have (exactly with
# the HF engine; vLLM or a server honouring `seed` nearly so), and the coordinator writes a shard once,
# after all of its rounds are back. Errors an engine raises (bad model, endpoint down) are not retried:
# only the death of the process is.
AGENT_MAX_RESTARTS = 3


@ray.remote(max_restarts=AGENT_MAX_RESTARTS, max_task_retries=-1)
class AgentActor:
    """Owns an engine for ``model_path`` and answers on behalf of the members named in ``members``."""

    def __init__(self, model: dict[str, Any], model_path: str, members: list[str],
                 prompts: PromptSet | str, adapters: dict[str, str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.members = members
        self.adapters = dict(adapters or {})  # member -> its LoRA adapter over ``model_path``
        self.model_cfg = ModelConfig(**model)
        # A PromptSet carries the method's prompt style; a bare string is the task's answer instruction.
        self.prompts = prompts if isinstance(prompts, PromptSet) else PromptSet(prompts)
        self.load_error: EngineError | None = None
        try:
            # A built-in model is built (or found cached) on this node; a served model's name is used as is.
            local = model_path if self.model_cfg.engine == "openai" else resolve_model_path(model_path)
            self._engine = make_engine(self.model_cfg, local, sorted(set(self.adapters.values())))
        except EngineError as exc:
            # Raised by the first method call instead (SocietyGroup calls info() at once): an error raised
            # here reaches the driver only as text inside ActorDiedError (a remote traceback), while one
            # raised by a method keeps its type and message.
            self.load_error = exc
            return
        logger.info("agent actor pid %d serves %s with %s%s", os.getpid(), ", ".join(members), model_path,
                    f" and {len(set(self.adapters.values()))} LoRA adapters" if self.adapters else "")

    @property
    def engine(self) -> Engine:
        """The loaded engine; every use raises the load error instead if the model could not be loaded."""
        if self.load_error is not None:
            raise self.load_error
        return self._engine

    def info(self) -> dict[str, Any]:
        """Who this actor serves; raises the engine's load error if the model could not be loaded."""
        return {"pid": os.getpid(), "members": self.members, "model_path": self.engine.model_path,
                "engine": type(self.engine).__name__, "adapters": self.adapters,
                "node": ray.get_runtime_context().get_node_id()}

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams,
                 member: str | None = None) -> list[str]:
        """Raw engine access (benchmarks, interactive use, STaR's rationalizations), as ``member`` (its
        adapter, if it has one; None: the model itself)."""
        return self.engine.generate(conversations, sampling, [self.adapters.get(member)] * len(conversations))

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str],
              member: str | None = None) -> list[float | None]:
        """Mean per-token NLL of each completion as ``member``'s reply (held-out NLL, ``Engine.score``)."""
        return self.engine.score(conversations, completions, self.adapters.get(member))

    def _run(self, per_member: list[list[Conversation]], sampling: SamplingParams,
             members: list[str]) -> list[TurnBatch]:
        # One engine call for all members served here: the biggest batch the engine can get (a LoRA society's
        # members included: each conversation carries its member's adapter).
        flat = [c for convs in per_member for c in convs]
        adapters = [self.adapters.get(m) for m, convs in zip(members, per_member) for _ in convs]
        texts = self.engine.generate(flat, sampling, adapters)
        out, k = [], 0
        for convs in per_member:
            out.append(TurnBatch(convs, texts[k:k + len(convs)]))
            k += len(convs)
        return out

    def round1(self, questions: list[str], agents: list[int], sampling: SamplingParams) -> Any:
        """Round 1 for generators ``agents``: one TurnBatch each."""
        per = [round1_messages(questions, self.prompts, n) for n in agents]
        return _unpack(self._run(per, sampling, [str(Member(GENERATOR, n)) for n in agents]))

    def summarize(self, questions: list[str], agents: list[int], sampling: SamplingParams,
                  orders: list[Orders], *previous: TurnBatch) -> Any:
        """s[m,n] for each n in ``agents``, from the round m-1 TurnBatches of all N agents.

        ``orders[k]`` is the order agent ``agents[k]`` sees the others in, per problem (None: agent order).
        """
        per = [summary_messages(questions, previous, n, self.prompts, order) for n, order in zip(agents, orders)]
        return _unpack(self._run(per, sampling, [str(Member(SUMMARIZER, 0))] * len(agents)))

    def critique(self, questions: list[str], agents: list[int], sampling: SamplingParams,
                 summarized: bool, orders: list[Orders], *refs: TurnBatch) -> Any:
        """Round m > 1 for critics ``agents``.

        ``refs`` holds the N round m-1 TurnBatches, then (if ``summarized``) one summary TurnBatch per
        entry of ``agents``; ``orders`` as in ``summarize`` (used when the others are concatenated).
        """
        n_agents = len(refs) - (len(agents) if summarized else 0)
        previous, summaries = refs[:n_agents], refs[n_agents:]
        per = []
        for k, n in enumerate(agents):
            contexts = (summaries[k].responses if summarized
                        else concatenated_contexts(questions, previous, n, self.prompts, orders[k]))
            per.append(critic_messages(previous[n], contexts, self.prompts, summarized, n))
        return _unpack(self._run(per, sampling, [str(Member(CRITIC, n)) for n in agents]))
