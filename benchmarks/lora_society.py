"""A LoRA society against a full one on the real model: serving memory and the 2N finetunes' wall time.

    python benchmarks/lora_society.py [--problems 24] [--engine vllm] [--max-new-tokens 64] [--lora-base-dtype auto]
                                      [--checkpointing config|off]

SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``), 3 agents x 2 rounds. The base society debates
the finetune split once; both modes then build the same per-agent sets from that one debate and finetune
all 2N agents (``stages.finetune_society``, as ``jobs.iterate`` does): ``finetune.adapter: full`` (2N whole
checkpoints) and ``lora`` (2N adapters of the frozen base). Each finetuned society (2N agents plus the base
summarizer) is then placed as ``jobs.iterate`` places it for its evaluation debate, and its serving memory
is the summed resident memory (RSS) of its agent-actor processes once loaded: 7 engines for the full
society (every member has its own weights), one for the LoRA society (one engine, 6 adapters). One engine
serving the base model alone is the reference (``base_model_memory_gb``).

Prints one JSON line: {"members", "full": {"society_memory_gb", "finetune_s", "engines"}, "lora": {...},
"base_model_memory_gb", "memory_ratio", "finetune_time_ratio", ...}; memory_ratio = LoRA society memory /
the base model's serving memory, finetune_time_ratio = LoRA finetune wall time / full (all 2N agents).
RSS counts each process's whole runtime (Python, torch, vLLM, its KV cache), not only the weights.

``--checkpointing off`` trains both modes without gradient checkpointing (smollm2_cpu.yaml turns it on so that
two lanes of fp32 full finetunes fit 24 GB): the full finetunes then run in the one lane the host memory
allows, on every core, and the adapters' one run skips the recomputed forward. Compare each mode at its
faster setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.group import SocietyGroup  # noqa: E402 - after the path and environment above
from actors.runtime import connect_ray  # noqa: E402
from mft_ray import stages  # noqa: E402
from mft_ray.config import Config, load_config  # noqa: E402
from mft_ray.models.builtin import build_builtin_model  # noqa: E402
from mft_ray.run.rundir import RunDir  # noqa: E402
from mft_ray.society.members import society_members  # noqa: E402
from mft_ray.tasks import make_splits, make_task  # noqa: E402
from mft_ray.training.joint_lora import base_dtype  # noqa: E402

GB = 2**30


def society_rss_gb(config: Config, paths: dict | None, name: str) -> tuple[float, int]:
    """(summed RSS of the society's agent actors once every model is loaded, number of engines)."""
    import psutil
    import ray

    with SocietyGroup(config, paths, name=name) as group:
        infos = ray.get([a.info.remote() for a in group.actors])
        rss = sum(psutil.Process(i["pid"]).memory_info().rss for i in infos)
        return rss / GB, len(group.actors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=24, help="finetune-split problems debated once")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lora-base-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="finetune.lora.base_dtype: the frozen base's dtype while the adapters train")
    ap.add_argument("--checkpointing", default="config", choices=["config", "off"],
                    help="off: finetune.gradient_checkpointing=false in both modes (default: the config's, on)")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="mft-lora-bench-"))
    # The task and sampling of the figures in docs/benchmarks.md (smollm2_cpu.yaml's were 0..50 at 0.7 then).
    common = ["task.form=a+b", "task.max_int=50", "sampling.temperature=0.7", f"task.finetune_size={args.problems}",
              "task.eval_size=1", f"model.engine={args.engine}", "model.max_model_len=1024", "model.kv_cache_gb=0.25",
              f"sampling.max_new_tokens={args.max_new_tokens}", "debate.agents=3", "debate.rounds=2",
              "finetune.generator.epochs=1", "finetune.critic.epochs=1", "finetune.zero_stage=2",
              "finetune.generator.max_length=512", "finetune.critic.max_length=1024",
              "finetune.cpus_per_worker=1", "metrics.embedding=false", "metrics.nll_problems=0"]
    if args.checkpointing == "off":
        common.append("finetune.gradient_checkpointing=false")
    own = {"full": [], "lora": [f"finetune.lora.base_dtype={args.lora_base_dtype}"]}
    configs = {mode: load_config(Path(__file__).resolve().parents[1] / "jobs/configs/smollm2_cpu.yaml",
                                 [*common, f"finetune.adapter={mode}", f"run_dir={work / mode}", *own[mode]])
               for mode in ("full", "lora")}
    build_builtin_model(configs["full"].model.path)  # once, in this process, with every core
    runtime = connect_ray()
    task = make_task(configs["full"].task)
    problems = make_splits(task, configs["full"].task).finetune

    # One debate of the base society; both runs build their sets from a copy of it.
    start = time.perf_counter()
    first = RunDir(configs["full"].run_dir)
    first.prepare(configs["full"])
    stages.debate_split(runtime, configs["full"], first, 0, "finetune", problems, None)
    debate_s = time.perf_counter() - start
    out: dict = {"members": len(society_members(3, True))}
    for mode, config in configs.items():
        run = RunDir(config.run_dir)
        if mode != "full":
            run.prepare(config)
            shutil.copytree(first.debate_dir(0, "finetune"), run.debate_dir(0, "finetune"), dirs_exist_ok=True)
        stages.build_datasets(config, run, task, 1)
        start = time.perf_counter()
        results = stages.finetune_society(runtime, config, run, 1)
        finetune_s = time.perf_counter() - start
        paths = stages.society_paths(config, run, 1)
        memory, engines = society_rss_gb(config, paths, f"bench-{mode}")
        size = sum(f.stat().st_size for name in results for f in run.agent_dir(1, name).rglob("*") if f.is_file())
        out[mode] = {"society_memory_gb": round(memory, 3), "finetune_s": round(finetune_s, 1), "engines": engines,
                     "finetunes": len(results), "checkpoints_mb": round(size / 2**20, 1),
                     "loss_after_over_before": [round(r["loss_after"] / r["loss_before"], 3) for r in results.values()]}
    base_memory, _ = society_rss_gb(configs["full"], None, "bench-base")  # iteration 0: one shared engine
    out.update({
        "base_model_memory_gb": round(base_memory, 3),
        "memory_ratio": round(out["lora"]["society_memory_gb"] / base_memory, 3),
        "finetune_time_ratio": round(out["lora"]["finetune_s"] / out["full"]["finetune_s"], 3),
        "debate_s": round(debate_s, 1), "problems": args.problems, "engine": args.engine,
        "gradient_checkpointing": configs["full"].finetune.gradient_checkpointing,
        # The full finetunes train float32 weights (finetune.bf16 is off on CPU); the adapters are float32
        # over a frozen base of this dtype.
        "model": "SmolLM2-135M-Instruct", "full": {**out["full"], "dtype": "float32"},
        "lora": {**out["lora"], "rank": configs["lora"].finetune.lora.rank,
                 "targets": configs["lora"].finetune.lora.target_modules,
                 "base_dtype": str(base_dtype(args.lora_base_dtype, False)).removeprefix("torch.")},
        "machine": describe_machine(),
    })
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
