"""The ``mft`` command: the jobs, the interactive debate service, and the state of a run directory.

    mft debate   --config C [--split finetune|eval] [key.sub=value ...]   debate one split
    mft evaluate --config C [--iteration L] [key.sub=value ...]            evaluate society L (Algorithm 2)
    mft iterate  --config C [key.sub=value ...]                            L finetuning iterations (Algorithm 1)
    mft report   ...                                                       the report job (jobs.report)
    mft serve    [--config C | --run-dir D [--iteration L]] [key.sub=value ...]   start the debate service
    mft ask      "question"                                                ask it; rounds print as they arrive
    mft stop                                                               stop it, release its resources
    mft status   RUN_DIR                                                   which stages and iterations are done
    mft plan     --config C [key.sub=value ...] [--nodes N ...]            resources and memory per GPU, checked
    mft export   --run-dir D --iteration L --member generator_0 --out DIR   one LoRA agent as a full checkpoint

``mft <command> --help`` describes each. Exit codes (as the jobs): 0 done, 2 bad input (config, data,
a missing service), 3 the cluster cannot hold the society, 4 a model failed to load or answer, 5 a finetune
failed for good.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
import sys
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from jobs.common import parse_config, run_cli
from mft_ray.config import load_config
from mft_ray.errors import EXIT_INPUT, ConfigError, EngineError
from mft_ray.methods.registry import method_config
from mft_ray.models.adapters import merge_adapter
from mft_ray.run.plan import ClusterSpec, resource_plan
from mft_ray.run.preflight import check_config
from mft_ray.run.rundir import RunDir
from mft_ray.run.status import format_status, run_status
from mft_ray.society.events import ERROR, format_event
from mft_ray.stages import society_paths

DEFAULT_NAME, NAMESPACE = "mft-debate", "mft"  # as actors.service (not imported here: it pulls in Ray)

_SERVICE_OPTIONS_HELP = ("Ray address: ray://<head>:10001 from outside the cluster, <head-ip>:6379 or auto "
                         "on a cluster node (default: $RAY_ADDRESS, else auto)")


@contextlib.contextmanager
def _prog(name: str) -> Iterator[None]:
    """Make a job's own parser call itself ``mft <command>`` in usage and errors (argparse reads argv[0])."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        sys.argv[0] = saved


def _job(module: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        job = importlib.import_module(f"jobs.{module}")
        with _prog(f"mft {module}"):
            return run_cli(job.cli, list(argv))
    return run


def _report(argv: Sequence[str]) -> int:
    job = importlib.import_module("jobs.report")
    with _prog("mft report"):
        return run_cli(job.cli, list(argv))


# -- the interactive service -------------------------------------------------------------------------


def _service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"service name (default {DEFAULT_NAME})")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace (default {NAMESPACE})")
    parser.add_argument("--address", default=None, help=_SERVICE_OPTIONS_HELP)


def _probe(address: str) -> None:
    """Fail in seconds on an address nothing listens on: Ray itself retries for 30 s (ray://) or minutes."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if address == "auto" or "://" in target:
        return
    parts = urlsplit(f"//{target}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"--address {address!r}: expected host:port or ray://host:port") from None
    if not host or port is None:
        raise ConfigError(f"--address {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: nothing accepts connections there ({exc.strerror or exc}); "
                          "is the Ray head running, and is that its "
                          + ("client server port (ray start --ray-client-server-port, default 10001)?"
                             if address.startswith("ray://") else "GCS port (default 6379)?")) from None


def _connect(address: str | None, namespace: str) -> None:
    # The Ray layer is imported by the commands that use it only: `mft status` and `--help` need no Ray.
    from actors.service import connect

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    _probe(address)
    try:
        connect(address, namespace, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({' '.join(str(exc).split())}); "
                          "start one with `ray start --head` or pass --address") from None


def _serve(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft serve", description="Start the named, detached debate service on a running Ray cluster. "
        "The society is the base model of --config, or society --iteration of --run-dir (weights from its "
        "society.json; the config from its config.yaml unless --config is given). The command returns once "
        "the service answers; the service runs until `mft stop`.")
    parser.add_argument("--config", help="YAML config file (see jobs/configs/)")
    parser.add_argument("--run-dir", help="serve a society of this run directory")
    parser.add_argument("--iteration", type=int, default=None,
                        help="which society of --run-dir (default: the latest finetuned one, else 0)")
    _service_args(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.iteration is not None and args.run_dir is None:
        raise ConfigError("--iteration needs --run-dir (the run whose society to serve)")
    iteration, paths = 0, None
    if args.run_dir is None:
        config = parse_config(args)
    else:
        run = RunDir(args.run_dir)
        if not run.root.is_dir():
            raise ConfigError(f"--run-dir: no such directory: {args.run_dir}")
        source = args.config or run.config_path
        if args.config is None and not run.config_path.is_file():
            raise ConfigError(f"--run-dir {args.run_dir} has no config.yaml; pass --config")
        config = load_config(source, [*args.overrides, f"run_dir={run.root}"])
        built = [it for it in range(1, config.finetune.iterations + 1) if run.read_society(it, repair=False) is not None]
        iteration = args.iteration if args.iteration is not None else max(built, default=0)
        if iteration < 0:
            raise ConfigError(f"--iteration must be >= 0, got {iteration}")
        if iteration > 0 and run.read_society(iteration, repair=False) is None:
            raise ConfigError(f"--iteration {iteration}: society {iteration} is not built in {run.root} "
                              f"({run.society_path(iteration)} is missing or broken)")
        paths = society_paths(config, run, iteration, repair=False)
    # The society serves as the method evaluates: its agents, rounds, summarizer, temperature.
    config = method_config(config, "evaluate")
    check_config(config, finetunes=False)  # the service finetunes nothing
    _connect(args.address, args.namespace)
    from actors.service import start_service

    info = start_service(config, iteration, paths, name=args.name)
    print(f"debate service {info['name']!r} is up in namespace {info['namespace']!r}: {info['agents']} agents, "
          f"{info['rounds']} rounds, society {info['iteration']} on {info['engines']} engine(s)")
    print(f"ask it: mft ask --name {info['name']} --namespace {info['namespace']} \"<question>\"  "
          f"(from outside the cluster add --address ray://<head>:10001); stop it: mft stop --name {info['name']}")


def _ask(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft ask", description="Ask the debate service a question; every round's responses, the "
        "summaries and the final majority answer print as the service produces them.")
    parser.add_argument("question", nargs="+", help="the question (several words are joined by spaces)")
    _service_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same question + seed = same debate)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the final answer")
    parser.add_argument("--json", action="store_true", help="print each event as one JSON line")
    args = parser.parse_args(argv)
    question = " ".join(args.question).strip()
    if not question:
        raise ConfigError("the question is empty")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout:g}")
    _connect(args.address, args.namespace)
    from actors.service import attach

    client = attach(args.name, args.namespace)
    try:
        for event in client.ask(question, seed=args.seed, timeout_s=args.timeout):
            print(json.dumps(event) if args.json else format_event(event), flush=True)
            if event["type"] == ERROR:
                raise EngineError(f"the debate failed: {event['message']}")
    except TimeoutError as exc:
        raise EngineError(str(exc)) from None


def _stop(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft stop", description="Stop the debate service: kill it and its society's agent actors and "
        "release their placement group (also cleans up after a service that died).")
    _service_args(parser)
    args = parser.parse_args(argv)
    _connect(args.address, args.namespace)
    from actors.service import stop_service

    done = stop_service(args.name, args.namespace)
    print(f"stopped debate service {args.name!r} in namespace {args.namespace!r}: "
          f"{len(done['agent_actors'])} agent actor(s) killed, placement group "
          f"{'released' if done['placement_group_removed'] else 'not found'}")


def _status(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft status", description="Show which stages and iterations of a run directory are complete "
        "(debate shards, datasets, finetunes, metrics, report), from the files each stage writes last. "
        "Read-only.")
    parser.add_argument("run_dir", help="the run directory (run_dir of the config)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))


def _plan(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft plan", description="Print the resource plan of a config on a described cluster: each "
        "society's engines, GPUs and CPUs, each finetune's workers and estimated memory per GPU "
        "(mft_ray/run/plan.py gives the formula), how many finetunes run at once. Exits 2 when the plan has "
        "problems (the jobs refuse those too). Starts nothing.")
    parser.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GiB per GPU (default: the config's resources.gpu_memory_gb, 80)")
    parser.add_argument("--cpus-per-node", type=float, default=96, help="CPUs per node (default 96)")
    parser.add_argument("--memory-gb-per-node", type=float, default=None,
                        help="GiB of memory Ray gives each node (`ray status`); CPU finetunes then run in as many "
                        "lanes as it holds at their estimate, as the jobs do (default: not described)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    config = parse_config(args)
    gpu_gb = config.resources.gpu_memory_gb if args.gpu_memory_gb is None else args.gpu_memory_gb
    plan = resource_plan(config, ClusterSpec(args.nodes, args.gpus_per_node, gpu_gb, args.cpus_per_node,
                                             args.memory_gb_per_node))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else f"plan of {args.config}\n{plan.format()}")
    if plan.problems:
        raise ConfigError(f"the plan has {len(plan.problems)} problem(s); the first: {plan.problems[0]}")


def _export(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mft export", description="Write one agent of a LoRA society (finetune.adapter: lora) as a full "
        "Hugging Face checkpoint: its base model with its adapter merged in (--merge, the only mode).")
    parser.add_argument("--run-dir", required=True, help="the run directory")
    parser.add_argument("--iteration", type=int, required=True, help="which society (>= 1)")
    parser.add_argument("--member", required=True, help="e.g. generator_0 or critic_2")
    parser.add_argument("--out", required=True, help="a new directory for the merged checkpoint")
    parser.add_argument("--merge", action="store_true", default=True, help="merge the adapter (default)")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    society = run.read_society(args.iteration, repair=False) if args.iteration >= 1 else None
    if society is None:
        raise ConfigError(f"--iteration {args.iteration}: {run.society_path(args.iteration)} is missing or broken")
    if args.member not in society:
        raise ConfigError(f"--member {args.member!r}: society {args.iteration} has {sorted(society)}")
    out = merge_adapter(society[args.member], args.out)
    print(f"wrote {out}: {args.member} of society {args.iteration} ({society[args.member]} merged into its base)")


def _own(fn: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], int]:
    return lambda argv: run_cli(fn, list(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "debate": (_job("debate"), "debate one split with a society and write its records"),
    "evaluate": (_job("evaluate"), "evaluate a society on the evaluation split (accuracy ± SE)"),
    "iterate": (_job("iterate"), "multiagent finetuning for L iterations, evaluating each society"),
    "report": (_report, "the results report of a run directory (jobs.report)"),
    "serve": (_own(_serve), "start the named debate service on a running Ray cluster"),
    "ask": (_own(_ask), "ask the debate service a question; rounds print as they arrive"),
    "stop": (_own(_stop), "stop the debate service and release its resources"),
    "status": (_own(_status), "which stages and iterations of a run directory are done"),
    "plan": (_own(_plan), "a config's resources and memory per GPU on a described cluster, checked"),
    "export": (_own(_export), "one agent of a LoRA society as a full Hugging Face checkpoint (merged)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (f"usage: mft <command> [options]   (mft <command> --help for its options)\n\ncommands:\n{rows}\n\n"
            "exit codes: 0 done, 2 bad input, 3 the cluster cannot hold the job, 4 a model failed, "
            "5 a finetune failed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mft`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return EXIT_INPUT
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (mft --help)",
              file=sys.stderr)
        return EXIT_INPUT
    try:
        return COMMANDS[command][0](rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
