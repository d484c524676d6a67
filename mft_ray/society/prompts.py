"""Prompt templates of the debate (after Du et al. 2023 and the Multiagent Finetuning paper).

Every prompt is a plain user message; the model's own chat template renders it both at inference and
in training, so the two never disagree (a defect of the authors' code).

A ``PromptSet`` has a *style*, chosen by the method (``mft_ray.methods.registry``):

- ``debate`` (default): the critic is asked to examine its own and the other agents' solutions and
  give an updated answer (Du et al.). These texts are fixed: the built-in testbeds were trained on them.
- ``cooperative``: the critic is asked to "derive a new solution by combining your solution with the
  solutions of other agents" (the paper's Appendix D wording) instead of critiquing them. Generator and
  summary prompts are those of ``debate``.
- ``unique_id``: every prompt opens with the agent's ID card in the paper's Appendix E.2 form, "Agent ID:
  GEN1 (This is a generation agent 1 tasked with creating a solution.)", critic n as ``CRIT<n+1>`` (its
  task sentence is ours, by analogy: the appendix quote we follow gives the generator's), and the other
  agents' responses it is shown are labelled with *their* IDs. Otherwise the texts of ``debate``.

``rationalize`` is STaR's hinted prompt (Zelikman et al. 2022): prompt0(x) with the ground-truth answer
given as a hint. It is used only by the STaR method's rationalization pass; the training example keeps
the un-hinted prompt0(x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

PROMPT_STYLES = ("debate", "cooperative", "unique_id")
ROLE_IDS = {"generator": "GEN", "critic": "CRIT"}
# The unique-ID card's description of each role (Appendix E.2 gives the generator's).
ROLE_CARDS = {"generator": "a generation agent {n} tasked with creating a solution",
              "critic": "a critic agent {n} tasked with evaluating and improving the solutions of the agents"}


def agent_id(role: str, agent: int) -> str:
    """The unique ID of agent ``agent`` (0-based) in ``role``: GEN1, GEN2, ..., CRIT1, ..."""
    return f"{ROLE_IDS[role]}{agent + 1}"


@dataclass(frozen=True)
class PromptSet:
    """The task-specific sentence on answer format, plus the prompt style (see the module docstring)."""

    answer_instruction: str = "Put your final answer in the form \\boxed{answer} at the end of your response."
    style: str = "debate"

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {list(PROMPT_STYLES)}, got {self.style!r}")

    def _addressed(self, role: str, agent: int | None, text: str) -> str:
        if self.style == "unique_id" and agent is not None:
            card = ROLE_CARDS[role].format(n=agent + 1)
            return f"Agent ID: {agent_id(role, agent)} (This is {card}.)\n\n{text}"
        return text

    def question(self, question: str, agent: int | None = None) -> str:
        """prompt0(x): the round-1 prompt of generator ``agent``."""
        return self._addressed("generator", agent,
                               f"{question}\nSolve the problem step by step. {self.answer_instruction}")

    def summary(self, question: str, others: Sequence[str], names: Sequence[str] | None = None) -> str:
        """Ask the summarizer to condense the other agents' previous-round responses.

        ``names`` labels each response (unique-ID style); by default they are "Agent 1", "Agent 2", ...
        """
        labels = list(names) if names is not None else [f"Agent {k + 1}" for k in range(len(others))]
        if len(labels) != len(others):
            raise ValueError(f"{len(others)} responses but {len(labels)} names")
        shown = "\n\n".join(f"{label}: {text}" for label, text in zip(labels, others))
        return (
            f"Here are responses from other agents to the problem: {question}\n\n{shown}\n\n"
            "Summarize these responses briefly, keeping each agent's key reasoning and final answer."
        )

    def critique(self, context: str, summarized: bool, agent: int | None = None) -> str:
        """critic_prompt(x, s): the round m > 1 prompt of critic ``agent``, after its own earlier turns."""
        if summarized:
            head = f"Here is a summary of the responses from other agents: {context}"
        else:
            head = f"These are the solutions to the problem from other agents: {context}"
        if self.style == "cooperative":
            ask = ("Work together with the other agents: derive a new solution by combining your solution "
                   "with the solutions of other agents.")
        else:
            ask = ("Using the reasoning from other agents as additional advice, can you give an updated "
                   "answer? Examine your solution and that of the other agents step by step.")
        return self._addressed("critic", agent, f"{head}\n\n{ask} {self.answer_instruction}")

    @staticmethod
    def concatenate(others: Sequence[str], names: Sequence[str] | None = None) -> str:
        """The "w/o summary" context: the other responses verbatim (labelled by ``names`` if given)."""
        if names is None:
            return "".join(f"\n\nOne agent solution: ```{text}```" for text in others)
        if len(names) != len(others):
            raise ValueError(f"{len(others)} responses but {len(names)} names")
        return "".join(f"\n\nSolution of agent {name}: ```{text}```" for name, text in zip(names, others))

    def rationalize(self, question: str, answer: str) -> str:
        """STaR's hinted prompt: prompt0(x) with the ground-truth ``answer`` given as a hint."""
        return (f"{question}\nHint: the correct final answer is {answer}. Solve the problem step by step "
                f"and reach this answer without mentioning the hint. {self.answer_instruction}")
