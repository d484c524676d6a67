"""Prompt templates of the debate (after Du et al. 2023 and the Multiagent Finetuning paper).

Every prompt is a plain user message; the model's own chat template renders it both at inference and
in training, so the two never disagree (a defect of the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PromptSet:
    """The task-specific sentence on answer format, plus the prompt style."""

    answer_instruction: str = "Put your final answer in the form \\boxed{answer} at the end of your response."

    def question(self, question: str) -> str:
        """prompt0(x): the round-1 prompt of a generator."""
        return f"{question}\nSolve the problem step by step. {self.answer_instruction}"

    def summary(self, question: str, others: Sequence[str]) -> str:
        """Ask the summarizer to condense the other agents' previous-round responses."""
        shown = "\n\n".join(f"Agent {k + 1}: {text}" for k, text in enumerate(others))
        return (
            f"Here are responses from other agents to the problem: {question}\n\n{shown}\n\n"
            "Summarize these responses briefly, keeping each agent's key reasoning and final answer."
        )

    def critique(self, context: str, summarized: bool) -> str:
        """critic_prompt(x, s): the round m > 1 prompt of a critic, after its own earlier turns."""
        if summarized:
            head = f"Here is a summary of the responses from other agents: {context}"
        else:
            head = f"These are the solutions to the problem from other agents: {context}"
        return (
            f"{head}\n\nUsing the reasoning from other agents as additional advice, can you give an "
            f"updated answer? Examine your solution and that of the other agents step by step. "
            f"{self.answer_instruction}"
        )

    @staticmethod
    def concatenate(others: Sequence[str]) -> str:
        """The "w/o summary" context: the other responses verbatim."""
        return "".join(f"\n\nOne agent solution: ```{text}```" for text in others)
