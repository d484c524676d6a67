"""Fault injection on a real local Ray: how many faults the pipeline survives, and what it loses.

    python benchmarks/faults.py [--skip-bad-input] [--skip-iterate]

Scenarios (each fault is injected into real processes or files, never simulated):
  agent_kill     SIGKILL two agent actors (separate engines) while debate shards are in flight; survived
                 if the debate completes with every record once and equal to an uninterrupted debate's.
  train_worker   SIGKILL a Ray Train worker after its first checkpoint: with finetune.max_failures=1 it
                 must resume and end with the weights of an uninterrupted finetune (survived); with 0 it
                 must fail with FinetuneError naming the agent and iteration, exporting nothing (counted
                 as failed_clearly, the configured behaviour).
  driver_kill    SIGKILL the jobs.iterate driver (and its local Ray) at the kill points of
                 tests/integration/test_iterate.py, rerunning the same command after each; survived if the final
                 metrics and every checkpoint equal an uninterrupted run's.
  corrupt_file   truncate one file of each kind in the finished run (a debate shard, counts.json, a
                 finetuning set, society.json, finetunes.json, a checkpoint's weights, metrics files, a
                 Ray Train run snapshot) and rerun; survived if each is detected and redone and the final
                 metrics and checkpoints still equal the uninterrupted run's.
  bad_input      tests/jobs/test_bad_input.py's refusal cases (its table, the real command line, unwritable
                 run directories), run by pytest: tried = cases run, refused clearly = cases passed (one
                 error line naming the problem, the expected exit code, no traceback, nothing left behind).

records_lost / records_duplicated count (problem, agent, role, round) records missing or repeated in
every debate directory the scenarios produced. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("benchmarks.faults")

ITERATE_OVERRIDES = ["task.finetune_size=24", "task.eval_size=12", "debate.shard_size=12"]


# -- records --------------------------------------------------------------------------------------------


def expected_keys(problem_ids: list[str], agents: int, rounds: int, summarize: bool) -> set[tuple]:
    keys = set()
    for pid in problem_ids:
        for n in range(agents):
            keys.add((pid, n, "generator", 1))
            for m in range(2, rounds + 1):
                keys.add((pid, n, "critic", m))
                if summarize:
                    keys.add((pid, n, "summarizer", m))
    return keys


def lost_and_duplicated(directory: Path, problem_ids: list[str], agents: int = 3, rounds: int = 2,
                        summarize: bool = True) -> tuple[int, int]:
    from mft_ray.run.records import read_records

    want = expected_keys(problem_ids, agents, rounds, summarize)
    try:
        rows = read_records(directory).to_pylist()
    except Exception:  # noqa: BLE001 - no readable records at all: everything is lost
        return len(want), 0
    got = Counter((r["problem_id"], r["agent"], r["role"], r["round"]) for r in rows)
    return len(want - set(got)), sum(c - 1 for c in got.values() if c > 1) + len(set(got) - want)


def _records_of(directory: Path) -> list[tuple]:
    from mft_ray.run.records import read_records

    return [(r["problem_id"], r["agent"], r["role"], r["round"], r["response"])
            for r in read_records(directory).to_pylist()]


# -- scenarios on the benchmark's own Ray -------------------------------------------------------------------


def agent_kills(work: Path, model: str) -> dict[str, Any]:
    """Kill the actor of generator_0 after the first shard and the actor of critic_1 after the third."""
    import ray

    from actors.coordinator import DebateCoordinator
    from actors.group import SocietyGroup
    from actors.runtime import RayRuntime
    from mft_ray.config import load_config
    from mft_ray.run.records import shard_path
    from mft_ray.tasks import make_splits, make_task

    config = load_config(REPO / "jobs/configs/iterate_cpu.yaml", [
        f"run_dir={work / 'agent'}", f"model.path={model}", "task.finetune_size=48", "task.eval_size=4",
        "debate.shard_size=8", "debate.shards_in_flight=2", "resources.share_engine=false",
        "resources.num_cpus_per_agent=0.25"])
    problems = make_splits(make_task(config.task), config.task).finetune
    out = work / "agent" / "killed"
    society = SocietyGroup(config, name="faults-bench")
    injected, survived, restarted = 0, 0, []
    try:
        coordinator = DebateCoordinator.remote(config.to_dict(), society.routes)
        done = coordinator.run.remote(0, "finetune", [(p.id, p.question) for p in problems], str(out))
        for member, after_shard in (("generator_0", 0), ("critic_1", 2)):
            actor = society.routes[member]
            pid = ray.get(actor.info.remote())["pid"]
            while not shard_path(out, after_shard).exists():
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            injected += 1
            restarted.append((actor, pid))
            logger.info("agent_kill: killed %s's actor (pid %d) after shard %d", member, pid, after_shard)
        stats = ray.get(done, timeout=600)
        alive_again = all(ray.get(a.info.remote())["pid"] != pid for a, pid in restarted)
        ray.kill(coordinator)
    finally:
        society.shutdown()
    lost, dup = lost_and_duplicated(out, [p.id for p in problems])
    RayRuntime().debate(config, 0, "finetune", problems, str(work / "agent" / "clean"))
    equal = _records_of(out) == _records_of(work / "agent" / "clean")
    if alive_again and lost == 0 and dup == 0 and equal:
        survived = injected
    return {"injected": injected, "survived": survived, "records_lost": lost, "records_duplicated": dup,
            "shards": stats["shards"], "records_equal_uninterrupted": equal, "actors_restarted": alive_again}


def train_worker_kills(work: Path, model: str) -> dict[str, Any]:
    import ray

    from actors.finetune import _fit
    from mft_ray.errors import FinetuneError, root_cause
    from tests.integration.test_faults import _finetune_job, _kill_worker_after_first_checkpoint
    from tests.integration.test_iterate import _differs, _params

    hook = work / "hook"
    result: dict[str, Any] = {"injected": 0, "survived": 0, "failed_clearly": 0}
    job = _finetune_job(work, model, "fail", hook)
    ref, _ = _kill_worker_after_first_checkpoint([job], 0, hook)
    result["injected"] += 1
    try:
        ray.get(ref, timeout=600)
        result["max_failures_0"] = "finished (unexpected)"
    except FinetuneError as exc:
        message = str(root_cause(exc))  # the FinetuneError's own line, without Ray's traceback
        clean_fail = "generator_0 of iteration 1" in message and not Path(job.output_dir).exists()
        result["failed_clearly"] += int(clean_fail)
        result["max_failures_0"] = message
    job = _finetune_job(work, model, "recover", hook)
    ref, _ = _kill_worker_after_first_checkpoint([job], 1, hook)
    result["injected"] += 1
    metrics = ray.get(ref, timeout=600)[job.name]
    clean = _finetune_job(work, model, "clean", None)
    ray.get(_fit.remote([clean], 1, 0.5, 0.0, 0, str(Path(clean.output_dir).parent / "ray_train")))
    same = not _differs(_params(job.output_dir), _params(clean.output_dir))
    result["max_failures_1"] = {"resumed_after_micro_batches": metrics.get("resumed_after_micro_batches"),
                                "weights_equal_uninterrupted": same}
    result["survived"] += int(bool(metrics.get("resumed_after_micro_batches")) and same)
    return result


# -- jobs.iterate runs in subprocesses ------------------------------------------------------------------------


def _iterate_cmd(run_dir: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "jobs.iterate", "--config", "jobs/configs/iterate_cpu.yaml", *ITERATE_OVERRIDES,
            f"run_dir={run_dir}", f"model.path={model}"]


def _run_iterate(run_dir: Path, model: str) -> None:
    done = subprocess.run(_iterate_cmd(run_dir, model), cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"jobs.iterate failed ({done.returncode}): {done.stderr[-2000:]}")


def _same_result(run: Path, reference: Path) -> bool:
    from tests.integration.test_iterate import _differs, _params

    a = json.loads((run / "metrics.json").read_text())["iterations"]
    b = json.loads((reference / "metrics.json").read_text())["iterations"]
    if [(e["accuracy"], e["consensus"]) for e in a] != [(e["accuracy"], e["consensus"]) for e in b]:
        return False
    for it in (1, 2):
        mine = json.loads((run / f"iter_{it}" / "society.json").read_text())
        ref = json.loads((reference / f"iter_{it}" / "society.json").read_text())
        if mine.keys() != ref.keys() or any(_differs(_params(mine[k]), _params(ref[k])) for k in ref):
            return False
    return True


def _run_records(run: Path, model: str) -> tuple[int, int]:
    from mft_ray.config import load_config
    from mft_ray.tasks import make_splits, make_task

    config = load_config(REPO / "jobs/configs/iterate_cpu.yaml", [*ITERATE_OVERRIDES, f"run_dir={run}",
                                                                   f"model.path={model}"])
    splits = make_splits(make_task(config.task), config.task)
    lost = dup = 0
    for d in sorted(run.glob("iter_*/debate_*")):
        ids = [p.id for p in (splits.eval if d.name == "debate_eval" else splits.finetune)]
        a, b = lost_and_duplicated(d, ids)
        lost, dup = lost + a, dup + b
    return lost, dup


def driver_kills(work: Path, model: str, reference: Path) -> dict[str, Any]:
    from tests.conftest import kill_session
    from tests.integration.test_iterate import ALL_KILL_POINTS, _assert_nothing_half_written

    run = work / "killed"
    cmd = _iterate_cmd(run, model)
    points = []
    for k, (what, ready, delay) in enumerate(ALL_KILL_POINTS):
        log = work / f"driver_kill_{k}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=err, start_new_session=True)
            deadline = time.time() + 900
            while time.time() < deadline and not ready(run) and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(delay)
            hit = proc.poll() is None and ready(run)
            ended = proc.poll()
            kill_session(proc.pid)
            proc.wait()
        if not hit:
            logger.warning("driver_kill: launch %d ended (exit code %s) before %s; its log: %s", k, ended, what,
                           log.read_text()[-3000:])
        whole = True
        try:
            _assert_nothing_half_written(run)
        except AssertionError:
            whole = False
        points.append({"kill_point": what, "killed_there": hit, "left_nothing_half_written": whole})
        logger.info("driver_kill: %s (killed there: %s, nothing half-written: %s)", what, hit, whole)
    _run_iterate(run, model)
    same = _same_result(run, reference)
    injected = sum(p["killed_there"] for p in points)
    survived = injected if same and all(p["left_nothing_half_written"] for p in points) else 0
    return {"injected": injected, "survived": survived, "final_equals_uninterrupted": same, "points": points,
            "run": run}


def corrupt_files(run: Path, model: str, reference: Path) -> dict[str, Any]:
    """Truncate one file of each kind in a finished run, rerun it, check each was redone."""
    from mft_ray.run.files import read_json_checked, read_sealed_json
    from mft_ray.run.records import read_records
    from mft_ray.run.rundir import RunDir
    from mft_ray.training.export import checkpoint_problem

    def truncate(path: Path, keep: float = 0.5) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    society2 = json.loads((run / "iter_2" / "society.json").read_text())
    trained = sorted(k for k, v in society2.items() if Path(v).parent == run / "iter_2")
    victim = trained[-1]  # a checkpoint that iteration 2 really trained
    snapshot = run / "iter_2" / "ray_train" / victim / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00')
    sets = sorted((run / "iter_2" / "datasets").glob("*.jsonl"), key=lambda p: -p.stat().st_size)
    lines = sets[0].read_bytes().splitlines(keepends=True)
    sets[0].write_bytes(b"".join(lines[:-1]))  # still valid JSONL: only the seal can tell
    cases = {
        "debate shard": run / "iter_0" / "debate_eval" / "shard_00000.parquet",
        "counts.json": run / "iter_1" / "datasets" / "counts.json",
        f"finetuning set {sets[0].name} (cut at a line)": sets[0],
        "society.json": run / "iter_1" / "society.json",
        "finetunes.json": run / "iter_2" / "finetunes.json",
        f"checkpoint weights ({victim})": run / "iter_2" / victim / "model.safetensors",
        "iteration metrics.json": run / "iter_1" / "metrics.json",
        "run metrics.json": run / "metrics.json",
        "Ray Train run snapshot": snapshot,
    }
    for name, path in cases.items():
        if not name.startswith(("finetuning set", "Ray Train")):
            truncate(path, 0.98 if "weights" in name else 0.5)
    _run_iterate(run, model)
    same = _same_result(run, reference)
    rd = RunDir(run)
    whole = {
        "debate shard": lambda p: read_records(p.parent).num_rows > 0,
        "counts.json": lambda p: read_sealed_json(p) is not None,
        "society.json": lambda p: rd.read_society(1) is not None,
        "finetunes.json": lambda p: read_json_checked(p) is not None,
        "iteration metrics.json": lambda p: read_json_checked(p) is not None,
        "run metrics.json": lambda p: read_json_checked(p) is not None,
    }
    detail = {}
    for name, path in cases.items():
        if name.startswith("finetuning set"):
            ok = read_sealed_json(path.parent / "counts.json") is not None
        elif name.startswith("checkpoint"):
            ok = checkpoint_problem(path.parent) is None
        elif name.startswith("Ray Train"):
            ok = not path.parent.exists()  # discarded, retrained from the start, removed once exported
        else:
            ok = whole[name](path)
        detail[name] = ok
    survived = sum(detail.values()) if same else 0
    return {"injected": len(cases), "survived": survived, "final_equals_uninterrupted": same, "files": detail}


def bad_inputs(work: Path) -> dict[str, Any]:
    """Run tests/jobs/test_bad_input.py's refusal cases; a case counts as refused clearly when its test passes."""
    report = work / "bad_input.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/jobs/test_bad_input.py",
                    "-k", "refused_clearly or exit_status or unwritable", f"--junitxml={report}"],
                   cwd=REPO, capture_output=True, text=True, timeout=1800)
    cases = ET.parse(report).getroot().iter("testcase")
    tried = refused = 0
    failed = []
    for case in cases:
        if case.find("skipped") is not None:
            continue
        tried += 1
        if case.find("failure") is None and case.find("error") is None:
            refused += 1
        else:
            failed.append(case.get("name"))
    return {"tried": tried, "refused_clearly": refused, "not_refused": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-bad-input", action="store_true")
    ap.add_argument("--skip-iterate", action="store_true", help="skip driver kills and corrupt files (slowest)")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import ray
    import torch

    from mft_ray.models.builtin import resolve_model_path
    from mft_ray.models.tiny import build_tiny_llama

    work = Path(args.work or tempfile.mkdtemp(prefix="mft-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    # Only the JSON line goes to stdout: Ray (and every subprocess) writes its own messages to stdout,
    # so stdout points at stderr until the end.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    start = time.time()
    scenarios: dict[str, Any] = {}
    if not args.skip_bad_input:
        t = time.time()
        scenarios["bad_input"] = {**bad_inputs(work), "seconds": round(time.time() - t, 1)}
        logger.info("bad_input: %s", scenarios["bad_input"])
    testbed = resolve_model_path("builtin:testbed-mini")
    tiny = str(build_tiny_llama(work / "tiny"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, fn, model in (("agent_kill", agent_kills, testbed), ("train_worker", train_worker_kills, tiny)):
            t = time.time()
            scenarios[name] = {**fn(work, model), "seconds": round(time.time() - t, 1)}
            logger.info("%s: %s", name, scenarios[name])
    finally:
        ray.shutdown()
    if not args.skip_iterate:
        t = time.time()
        reference = work / "reference"
        _run_iterate(reference, testbed)
        scenarios["reference_run_seconds"] = round(time.time() - t, 1)
        t = time.time()
        killed = driver_kills(work, testbed, reference)
        run = killed.pop("run")
        scenarios["driver_kill"] = {**killed, "seconds": round(time.time() - t, 1)}
        logger.info("driver_kill: %s", scenarios["driver_kill"])
        records = {"reference": _run_records(reference, testbed), "killed": _run_records(run, testbed)}
        t = time.time()
        scenarios["corrupt_file"] = {**corrupt_files(run, testbed, reference), "seconds": round(time.time() - t, 1)}
        logger.info("corrupt_file: %s", scenarios["corrupt_file"])
        records["after corruption"] = _run_records(run, testbed)
        scenarios["run_records"] = {k: {"lost": v[0], "duplicated": v[1]} for k, v in records.items()}
    fault_kinds = [s for s in ("agent_kill", "train_worker", "driver_kill", "corrupt_file") if s in scenarios]
    lost = scenarios["agent_kill"]["records_lost"] + sum(v["lost"] for v in scenarios.get("run_records", {}).values())
    dup = scenarios["agent_kill"]["records_duplicated"] + sum(
        v["duplicated"] for v in scenarios.get("run_records", {}).values())
    summary = {
        "faults_injected": sum(scenarios[s]["injected"] for s in fault_kinds),
        "faults_survived": sum(scenarios[s]["survived"] for s in fault_kinds),
        "faults_failed_clearly": scenarios["train_worker"]["failed_clearly"],
        "records_lost": lost,
        "records_duplicated": dup,
        "bad_inputs_tried": scenarios.get("bad_input", {}).get("tried"),
        "bad_inputs_refused_clearly": scenarios.get("bad_input", {}).get("refused_clearly"),
        "scenarios": scenarios,
        "seconds": round(time.time() - start, 1),
        "machine": {"cpu": describe_machine(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "gpu": torch.cuda.is_available()},
    }
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    print(json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
