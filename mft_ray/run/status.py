"""Which stages of a run directory are complete, read from the files each stage writes last (read-only).

Every stage's output is atomic (``mft_ray.run.rundir``): a debate shard, ``datasets/counts.json``, a
checkpoint directory and ``society.json`` exist only once complete, so their presence is the marker.
Nothing here writes, deletes or loads a model; a config whose model path has gone away still reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from mft_ray.config import Config
from mft_ray.errors import ConfigError
from mft_ray.methods.registry import METHODS, train_units
from mft_ray.run.records import shard_files
from mft_ray.run.rundir import DEFAULT_METHOD, RunDir


@dataclass
class Stage:
    """One stage of one iteration: done or not, and what was found."""

    name: str
    done: bool
    detail: str


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def _settings(run: RunDir) -> dict[str, Any]:
    """The few settings status needs, from config.yaml as written (no validation: the model may be gone)."""
    defaults = Config.__dataclass_fields__
    path = run.config_path
    saved = run.saved_config()
    data: dict[str, Any] = saved or {}
    task, debate, ft = _section(data, "task"), _section(data, "debate"), _section(data, "finetune")
    d_task = defaults["task"].default_factory()
    d_debate = defaults["debate"].default_factory()
    d_ft = defaults["finetune"].default_factory()
    method = str(data.get("method", DEFAULT_METHOD))
    if method not in METHODS:
        raise ConfigError(f"{path}: unknown method {method!r}")
    try:
        iterations = 0 if METHODS[method].evaluation_only else int(ft.get("iterations", d_ft.iterations))
        return {"has_config": saved is not None, "method": method, "task": str(task.get("name", d_task.name)),
                "finetune_size": int(task.get("finetune_size", d_task.finetune_size)),
                "eval_size": int(task.get("eval_size", d_task.eval_size)),
                "agents": int(debate.get("agents", d_debate.agents)),
                "rounds": int(debate.get("rounds", d_debate.rounds)),
                "shard_size": max(1, int(debate.get("shard_size", d_debate.shard_size))),
                "iterations": iterations}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a size, agent or iteration count is not a number ({exc})") from None


def _debate_stage(run: RunDir, iteration: int, split: str, problems: int, shard_size: int) -> Stage:
    expected = math.ceil(problems / shard_size)
    directory = run.debate_dir(iteration, split)
    have = len(shard_files(directory))
    return Stage(f"{split} debate", expected > 0 and have >= expected, f"{have}/{expected} shards")


def run_status(root: str | os.PathLike) -> dict[str, Any]:
    """Per iteration, each stage's state; plus the report and whether the whole run is complete.

    Iteration 0: eval debate, metrics, finetune debate (if L >= 1). Iteration l >= 1: datasets,
    finetunes (society.json), eval debate, metrics, finetune debate (if l < L). L comes from the saved
    config (finetune.iterations); iterations found on disk beyond it are shown too.
    """
    run = RunDir(root)
    if not run.root.is_dir():
        raise ConfigError(f"run directory does not exist: {root}")
    found = run.iterations_on_disk()
    settings = _settings(run)
    if not settings["has_config"] and not found:
        raise ConfigError(f"{root} is not a run directory (no config.yaml and no iter_<l>/)")
    last = max([settings["iterations"], *found])
    n = settings["agents"]
    iterations = []
    for it in range(last + 1):
        stages: list[Stage] = []
        if it >= 1:
            counts = run.datasets_marker(it)
            stages.append(Stage("datasets", counts.is_file(), counts.name if counts.is_file() else "missing"))
            # What this method trains: 2N agents, N generators, or one shared model (single_agent/).
            members = [u.name for u in train_units(METHODS[settings["method"]], n)]
            ckpts = sum((run.agent_dir(it, m) / "config.json").is_file() for m in members)  # an HF checkpoint's
            built = run.society_path(it).is_file()
            stages.append(Stage("finetunes", built, f"{ckpts}/{len(members)} checkpoints"
                                + (", society.json" if built else ", no society.json")))
        stages.append(_debate_stage(run, it, "eval", settings["eval_size"], settings["shard_size"]))
        metrics_path = run.metrics_path(it)
        detail, readable = "missing", False
        if metrics_path.is_file():
            try:
                m = json.loads(metrics_path.read_text())
                detail = f"accuracy {m['accuracy']:.3f} ± {m['stderr']:.3f}, consensus {m['consensus']:.3f}"
                readable = True
            except (OSError, ValueError, KeyError, TypeError):
                detail = "present but unreadable: the job redoes it"
        stages.append(Stage("metrics", readable, detail))
        if it < settings["iterations"]:
            stages.append(_debate_stage(run, it, "finetune", settings["finetune_size"], settings["shard_size"]))
        iterations.append({"iteration": it, "done": all(s.done for s in stages),
                           "stages": [asdict(s) for s in stages]})
    report = run.report_path.is_file()
    pending = [(e["iteration"], s["name"]) for e in iterations for s in e["stages"] if not s["done"]]
    return {"run_dir": str(run.root), "settings": settings, "iterations": iterations, "report": report,
            "complete": not pending and report,
            "next": f"iteration {pending[0][0]}: {pending[0][1]}" if pending else (None if report else "report")}


def format_status(status: dict[str, Any]) -> str:
    """The status as lines for a terminal."""
    s = status["settings"]
    lines = [f"run directory {status['run_dir']}: {s['task']}, {s['agents']} agents, {s['rounds']} rounds, "
             f"{s['iterations']} finetuning iteration(s)" + ("" if s["has_config"] else " (no config.yaml: defaults)")]
    for entry in status["iterations"]:
        parts = [f"{st['name']} {'done' if st['done'] else 'TODO'} ({st['detail']})" for st in entry["stages"]]
        lines.append(f"iteration {entry['iteration']}: {'complete' if entry['done'] else 'incomplete'} | "
                     + " | ".join(parts))
    lines.append(f"report ({RunDir(status['run_dir']).report_path.name}): {'done' if status['report'] else 'missing'}")
    lines.append("run complete" if status["complete"] else f"run incomplete; next: {status['next']}")
    return "\n".join(lines)
