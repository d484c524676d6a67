"""The interactive debate service: a named, detached actor that debates questions as users ask them.

    mft serve --config jobs/configs/iterate_cpu.yaml            # or: --run-dir runs/x --iteration 2
    mft ask "What is the result of 1+2*3+0-1*2?"               # prints each round as it arrives
    mft stop

From Python (a Ray client or a session on the cluster)::

    client = attach(address="ray://<head>:10001")    # name "mft-debate", namespace "mft"
    for event in client.ask("What is the result of 1+2*3+0-1*2?"):
        print(event)                                  # round 1 answers, summaries, critics, final

The society's agent actors (``<name>-agent-<i>``), their placement group (``<name>``) and the service
(``<name>``) are detached and named in one namespace: they outlive the ``mft serve`` driver and are
ended by ``stop_service``. The service is an async actor, so many askers are served at once; each
question's rounds run through the same ``submit_rounds`` graph as the batch debate, seeded by
(seed, iteration, "interactive", question, round, role, agents).

Events come over a long-poll cursor (``start`` -> question id, ``next_events(id, cursor, timeout)``)
rather than a Ray streaming generator: Ray Client (``ray://``) refuses ``num_returns="streaming"``
("not currently supported when using Ray Client", checked on Ray 2.60), and ``ray://`` is how users
reach a cluster. ``DebateClient.ask`` wraps the cursor in a plain Python generator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Iterator

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from actors.coordinator import submit_rounds
from actors.group import SocietyGroup
from mft_ray.config import Config, config_from_dict
from mft_ray.errors import ServiceError, root_cause
from mft_ray.society.events import ERROR, FINAL, START, Event, EventStream, StreamRegistry, question_key, turn_event
from mft_ray.society.members import SUMMARIZER, Member
from mft_ray.society.voting import majority_vote, vote_rng
from mft_ray.tasks import make_task

logger = logging.getLogger(__name__)

NAMESPACE = "mft"
DEFAULT_NAME = "mft-debate"
SPLIT = "interactive"  # the split name in the seeds of interactive questions


@ray.remote(num_cpus=0)
class DebateService:
    """Debates questions with a running society; ``routes`` maps member names to agent actors.

    Async actor: ``start`` returns at once and the debate runs as an asyncio task; askers long-poll
    ``next_events``. Nothing here blocks the event loop (ObjectRefs are awaited).
    """

    def __init__(self, config: dict[str, Any], routes: dict[str, Any], iteration: int, name: str,
                 agent_names: list[str], placement_group: PlacementGroup | None,
                 weights: dict[str, str]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config: Config = config_from_dict(config)
        self.task = make_task(self.config.task)
        self.routes = routes
        self.iteration = iteration
        self.name = name
        self.agent_names = agent_names
        self.placement_group = placement_group
        self.weights = weights
        self.streams = StreamRegistry()
        self.started = time.time()
        self.asked = 0
        self._running: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    async def info(self) -> dict[str, Any]:
        """Who serves: society shape, iteration, each member's weights, load."""
        ctx = ray.get_runtime_context()
        return {"name": self.name, "namespace": ctx.namespace, "iteration": self.iteration,
                "agents": self.config.debate.agents, "rounds": self.config.debate.rounds,
                "summarize": self.config.debate.summarize, "task": self.config.task.name,
                "weights": self.weights, "engines": len(self.agent_names) or len({id(a) for a in self.routes.values()}),
                "agent_actors": self.agent_names, "questions_in_flight": self.streams.active(),
                "questions_asked": self.asked, "uptime_s": round(time.time() - self.started, 1),
                "pid": os.getpid(), "node": ctx.get_node_id()}

    async def describe(self) -> dict[str, Any]:
        """What ``stop_service`` must release: the agent actors' names and the placement group."""
        return {"agent_actors": self.agent_names, "placement_group": self.placement_group}

    async def start(self, question: str, seed: int = 0) -> str:
        """Begin debating ``question``; returns its id for ``next_events``. The same question and seed
        sample the same debate (as long as the society is the same)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        stream = self.streams.new(question)
        self.asked += 1
        stream.append({"type": START, "question": question, "agents": self.config.debate.agents,
                       "rounds": self.config.debate.rounds, "iteration": self.iteration, "seed": seed})
        task = asyncio.get_running_loop().create_task(self._debate(stream, question, seed))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return stream.question_id

    async def next_events(self, question_id: str, cursor: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """Events of ``question_id`` from ``cursor`` on, waiting up to ``timeout_s`` (at most 60) for one.

        Returns {"events": [...], "done": bool, "sent": when this reply left the service}; once done, no
        event follows.
        """
        events, done = await self.streams.get(question_id).read(cursor, min(float(timeout_s), 60.0))
        return {"events": events, "done": done, "sent": time.time()}

    async def forget(self, question_id: str) -> None:
        """The asker has read everything: drop the question's events now instead of after keep_s."""
        self.streams.forget(question_id)

    async def _debate(self, stream: EventStream, question: str, seed: int) -> None:
        key = question_key(question, seed)
        try:
            refs = submit_rounds(self.config, self.routes, self.iteration, SPLIT, key, [(str(key), question)])
            finals: list[str | None] = []
            for turn, per_agent in refs.items():  # rounds in the order they run

                async def one(n: int, ref: Any) -> tuple[int, Any]:
                    return n, await ref

                answers: dict[int, str | None] = {}
                # Within a round, each agent's turn is shown as soon as its actor returns it.
                for done in asyncio.as_completed([one(n, r) for n, r in enumerate(per_agent)]):
                    n, batch = await done
                    text = batch.responses[0]
                    answer = None if turn.role == SUMMARIZER else self.task.extract_answer(text)
                    answers[n] = answer
                    stream.append(turn_event(turn, n, text, answer))
                if turn.role != SUMMARIZER:
                    finals = [answers[n] for n in range(len(per_agent))]
            vote = majority_vote(finals, self.task.equivalent, vote_rng(self.config.seed, key))
            stream.append({"type": FINAL, "answer": vote.answer, "votes": vote.votes, "tie": vote.tie,
                           "consensus": vote.consensus, "answers": finals})
            logger.info("question %s answered: %s (consensus %.2f)", stream.question_id, vote.answer,
                        vote.consensus)
        except Exception as exc:  # noqa: BLE001 - the asker must get an end to its stream, whatever failed
            cause = root_cause(exc)
            logger.exception("question %s failed", stream.question_id)
            message = " ".join(str(cause).split()) or type(cause).__name__
            stream.append({"type": ERROR, "message": f"{type(cause).__name__}: {message}"})


# -- driver side -------------------------------------------------------------------------------------


def _find(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def start_service(config: Config, iteration: int = 0, model_paths: dict[Member, str] | None = None,
                  name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Place and load a detached society and start the named service in the current Ray namespace.

    ``model_paths`` gives each member's weights (None: every member is ``config.model.path``). Raises
    ServiceError if a service of that name already runs, PlacementError if the cluster cannot hold the
    society, EngineError if a model cannot be loaded; nothing is left running after an error.
    Returns the service's ``info()``.
    """
    namespace = ray.get_runtime_context().namespace
    if _find(name, namespace) is not None:
        raise ServiceError(f"a debate service named {name!r} already runs in namespace {namespace!r}; "
                           f"stop it first (mft stop --name {name}) or choose another --name")
    society = SocietyGroup(config, model_paths, name=name, detached=True)
    service = None
    try:
        service = DebateService.options(name=name, lifetime="detached").remote(
            config.to_dict(), society.routes, iteration, name, society.actor_names, society.pg, society.paths)
        info = ray.get(service.info.remote())
    except Exception:
        if service is not None:
            ray.kill(service)
        society.shutdown()
        raise
    logger.info("debate service %r is up in namespace %r: %d agents, %d rounds, society %d, %d engine(s)",
                name, namespace, info["agents"], info["rounds"], iteration, info["engines"])
    return info


def stop_service(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> dict[str, Any]:
    """Kill the service and its society's actors and release the placement group.

    Also cleans up after a service that died (its agents are found by name). Raises ServiceError if
    nothing by that name exists. Returns what was stopped.
    """
    service = _find(name, namespace)
    agents: list[str] = []
    pg: PlacementGroup | None = None
    if service is not None:
        try:
            described = ray.get(service.describe.remote(), timeout=30)
            agents, pg = list(described["agent_actors"]), described["placement_group"]
        except Exception as exc:  # noqa: BLE001 - a dead or stuck service is still stopped below
            logger.warning("service %r did not describe itself (%s); cleaning up by name", name, root_cause(exc))
        ray.kill(service)
    prefix = f"{name}-agent-"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == namespace and entry.get("name", "").startswith(prefix):
            if entry["name"] not in agents:
                agents.append(entry["name"])
    killed = []
    for agent in agents:
        handle = _find(agent, namespace)
        if handle is not None:
            ray.kill(handle)
            killed.append(agent)
    if pg is None and ray.get_runtime_context().namespace == namespace:
        try:
            pg = ray.util.get_placement_group(name)
        except ValueError:
            pg = None
    if pg is not None:
        remove_placement_group(pg)
    if service is None and not killed and pg is None:
        raise ServiceError(f"no debate service named {name!r} in namespace {namespace!r}")
    logger.info("stopped %s", ", ".join(([name] if service is not None else []) + killed) or "nothing")
    return {"service": name if service is not None else None, "agent_actors": killed,
            "placement_group_removed": pg is not None}


class DebateClient:
    """A handle on a running service. ``ask`` yields each event as the service produces it."""

    def __init__(self, handle: Any, name: str, namespace: str) -> None:
        self.handle = handle
        self.name = name
        self.namespace = namespace

    def info(self) -> dict[str, Any]:
        return self._get(self.handle.info.remote())

    def ask(self, question: str, seed: int = 0, timeout_s: float | None = None,
            poll_s: float = 10.0) -> Iterator[Event]:
        """Ask ``question``; yields the start event, every round's responses (summaries too), then the
        final majority answer (or an error event), each with ``sent``: when the service handed it over.
        Raises TimeoutError after ``timeout_s`` without the end, ServiceError if the service dies."""
        question_id = self._get(self.handle.start.remote(question, seed))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cursor = 0
        try:
            while True:
                wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
                batch = self._get(self.handle.next_events.remote(question_id, cursor, wait))
                for event in batch["events"]:
                    yield {**event, "sent": batch["sent"]}
                cursor += len(batch["events"])
                if batch["done"]:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"question {question_id} got no final answer within {timeout_s:g}s")
        finally:
            self.handle.forget.remote(question_id)  # fire and forget; the service also drops it later

    def ask_with_callback(self, question: str, callback: Callable[[Event], None], seed: int = 0,
                          timeout_s: float | None = None) -> Event:
        """Call ``callback(event)`` for every event as it arrives; returns the last (final or error)."""
        last: Event = {}
        for event in self.ask(question, seed=seed, timeout_s=timeout_s):
            callback(event)
            last = event
        return last

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise ServiceError(f"the debate service {self.name!r} in namespace {self.namespace!r} is gone "
                               f"({type(exc).__name__}); restart it with mft serve") from None
        except ray.exceptions.RayTaskError as exc:
            raise root_cause(exc) from None


# Ray Client's proxier starts one server process per connecting client, and that process can die as it is
# spawned (ray-project/ray#63202, open on Ray 2.60; seen in CI with two clients connecting at once): the
# connection then fails with "Initialization failure from server". A new connection gets a new process.
CLIENT_CONNECT_ATTEMPTS = 3


def connect(address: str, namespace: str = NAMESPACE, **init_kwargs: Any) -> None:
    """``ray.init(address, namespace=...)``, retrying a Ray Client connection whose server process failed
    to start; any other failure, or the last attempt's, is raised as it is."""
    for attempt in range(1, CLIENT_CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=namespace, **init_kwargs)
            return
        except ConnectionAbortedError as exc:
            if (not str(address).startswith("ray://") or "Initialization failure from server" not in str(exc)
                    or attempt == CLIENT_CONNECT_ATTEMPTS):
                raise
            logger.warning("Ray Client at %s: its server process for this connection failed to start "
                           "(attempt %d of %d); connecting again", address, attempt, CLIENT_CONNECT_ATTEMPTS)
            time.sleep(attempt)


def attach(name: str = DEFAULT_NAME, namespace: str = NAMESPACE, address: str | None = None) -> DebateClient:
    """A client for the service ``name`` in ``namespace``.

    Connects first if Ray is not initialised: to ``address`` (``ray://<head>:10001`` from outside the
    cluster, ``auto`` on a cluster node). Raises ServiceError if no such service runs.
    """
    if not ray.is_initialized():
        if address is None:
            raise ServiceError("not connected to Ray: call ray.init('ray://<head>:10001') first or pass address=")
        connect(address, namespace)
    handle = _find(name, namespace)
    if handle is None:
        raise ServiceError(f"no debate service named {name!r} in namespace {namespace!r}; start one with "
                           f"mft serve (mft serve --name {name})")
    return DebateClient(handle, name, namespace)
