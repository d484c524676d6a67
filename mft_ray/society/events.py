"""Events of an interactive debate, and the buffer that streams them to askers (no Ray here).

A question put to the debate service produces, in this order::

    start                                       the question, society shape, iteration
    response  round 1, generator n               for every agent n
    summary   round m, summarizer for agent n    (m > 1, unless debate.summarize is off)
    response  round m, critic n                  for every agent n
    ...
    final                                       majority answer, votes, consensus, tie, every final answer
    error                                       instead of the rest, if the debate failed

Events are plain dicts (they travel through Ray Client and print as JSON). Each carries ``seq`` (its
position in the question's stream) and ``t`` (service wall-clock time when it was produced).
``EventStream`` is a long-poll buffer: askers read ``events[cursor:]`` and wait until there are new
ones, so a client sees each round as soon as the service has it, whatever its transport.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any

from mft_ray.society.debate import Turn
from mft_ray.society.members import SUMMARIZER

Event = dict[str, Any]

START, RESPONSE, SUMMARY, FINAL, ERROR = "start", "response", "summary", "final", "error"
TERMINAL = (FINAL, ERROR)


def question_key(question: str, seed: int) -> str:
    """What seeds one question's calls: the same question and seed sample the same debate."""
    return f"{hashlib.sha256(question.encode()).hexdigest()[:16]}-{seed}"


def turn_event(turn: Turn, agent: int, text: str, answer: str | None) -> Event:
    """The event of agent ``agent``'s part of ``turn`` (the coordinator's key); round and role go into
    the event as a plain int and str, so clients need no mft_ray type to read it."""
    if turn.role == SUMMARIZER:
        return {"type": SUMMARY, "round": turn.round, "role": turn.role, "agent": agent, "text": text}
    return {"type": RESPONSE, "round": turn.round, "role": turn.role, "agent": agent, "text": text,
            "answer": answer}


class EventStream:
    """The ordered events of one question; readers wait for events past their cursor.

    Used inside one asyncio event loop (the service actor's): appends and waits never race.
    """

    def __init__(self, question_id: str, question: str) -> None:
        self.question_id = question_id
        self.question = question
        self.events: list[Event] = []
        self.done = False
        self.finished_at: float | None = None
        self._changed = asyncio.Event()

    def append(self, event: Event) -> Event:
        """Stamp ``event`` with seq, time and question id, store it, wake readers; ends on final/error."""
        if self.done:
            raise RuntimeError(f"question {self.question_id} is finished; no more events")
        event = {**event, "seq": len(self.events), "t": time.time(), "question_id": self.question_id}
        self.events.append(event)
        if event["type"] in TERMINAL:
            self.done = True
            self.finished_at = time.monotonic()
        self._changed.set()
        return event

    async def read(self, cursor: int, timeout_s: float) -> tuple[list[Event], bool]:
        """Events from ``cursor`` on, waiting up to ``timeout_s`` for at least one; and whether the stream
        is finished (then no event will follow the ones returned)."""
        if cursor < 0 or cursor > len(self.events):
            raise ValueError(f"cursor {cursor} is outside 0..{len(self.events)}")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while cursor == len(self.events) and not self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return self.events[cursor:], self.done


class StreamRegistry:
    """Streams by question id. Finished streams are dropped ``keep_s`` after they end (or when the asker
    says it is done), so an asker that vanished mid-question leaks nothing for long."""

    def __init__(self, keep_s: float = 600.0) -> None:
        self.keep_s = keep_s
        self.streams: dict[str, EventStream] = {}

    def new(self, question: str) -> EventStream:
        self.evict()
        stream = EventStream(uuid.uuid4().hex[:12], question)
        self.streams[stream.question_id] = stream
        return stream

    def get(self, question_id: str) -> EventStream:
        try:
            return self.streams[question_id]
        except KeyError:
            raise KeyError(f"no question {question_id!r} (finished questions are kept {self.keep_s:g}s)") from None

    def forget(self, question_id: str) -> None:
        self.streams.pop(question_id, None)

    def evict(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for qid in [q for q, s in self.streams.items()
                    if s.finished_at is not None and now - s.finished_at > self.keep_s]:
            del self.streams[qid]

    def active(self) -> int:
        return sum(not s.done for s in self.streams.values())


def format_event(event: Event, width: int = 160) -> str:
    """One line for a terminal: who said what (the text squeezed to ``width`` characters)."""
    kind = event.get("type")
    if kind == START:
        return (f"question {event['question_id']}: {event['question']}  "
                f"({event['agents']} agents, {event['rounds']} rounds, society {event['iteration']})")
    if kind in (RESPONSE, SUMMARY):
        text = " ".join(str(event.get("text", "")).split())
        if len(text) > width:
            text = text[: width - 3] + "..."
        who = f"summary for agent {event['agent']}" if kind == SUMMARY else f"{event['role']} {event['agent']}"
        tail = f"  -> {event['answer']}" if kind == RESPONSE else ""
        return f"[round {event['round']}] {who}: {text}{tail}"
    if kind == FINAL:
        tie = ", tie broken at random" if event.get("tie") else ""
        return (f"final answer: {event['answer']}  ({event['votes']}/{len(event['answers'])} votes, "
                f"consensus {event['consensus']:.2f}{tie}; answers {event['answers']})")
    if kind == ERROR:
        return f"error: {event.get('message')}"
    return str(event)
