"""Debate throughput: the authors' sequential loop vs the Ray coordinator vs the raw engine.

    python benchmarks/debate_throughput.py [--problems 200] [--max-new-tokens 64]

(a) sequential: problem -> round -> agent, batch-1 generation (the authors' code structure), in-process;
(b) coordinator: the same 3-agent, 2-round debate through Ray actors (shared engine, shards pipelined);
(c) raw engine: the conversations (b) sent, regenerated in large batches in-process.
All three use the same tiny HF model on CPU and the same prompts and sampling settings. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sequential(engine, problems, prompts, agents, rounds, sampling):
    """The authors' structure: for each problem, for each round, for each agent, one generate call."""
    from mft_ray.society.debate import TurnBatch, critic_messages, round1_messages, summary_messages

    calls = 0
    for p in problems:
        prev = []
        for n in range(agents):
            msgs = round1_messages([p.question], prompts)
            prev.append(TurnBatch(msgs, engine.generate(msgs, sampling)))
            calls += 1
        for _ in range(2, rounds + 1):
            new = []
            for n in range(agents):
                s_msgs = summary_messages([p.question], prev, n, prompts)
                summary = engine.generate(s_msgs, sampling)
                c_msgs = critic_messages(prev[n], summary, prompts, summarized=True)
                new.append(TurnBatch(c_msgs, engine.generate(c_msgs, sampling)))
                calls += 2
            prev = new
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args()

    import ray
    import torch

    from actors.runtime import RayRuntime
    from mft_ray.config import load_config
    from mft_ray.engines import SamplingParams, make_engine
    from mft_ray.models.tiny import build_tiny_llama
    from mft_ray.run.records import read_records
    from mft_ray.society.prompts import PromptSet
    from mft_ray.tasks import make_splits, make_task

    work = Path(tempfile.mkdtemp(prefix="mft-bench-"))
    model = str(build_tiny_llama(work / "model"))
    cpus = os.cpu_count() or 2
    config = load_config(None, [
        f"run_dir={work / 'run'}", f"model.path={model}", "task.name=arithmetic",
        f"task.finetune_size={args.problems}", "task.eval_size=0", f"debate.agents={args.agents}",
        f"debate.rounds={args.rounds}", f"debate.shard_size={args.shard_size}",
        f"sampling.max_new_tokens={args.max_new_tokens}", "resources.share_engine=true",
        f"resources.num_cpus_per_agent={cpus}", "model.max_batch_size=512", "model.static_cache=true",
    ])
    task = make_task(config.task)
    problems = make_splits(task, config.task).finetune
    prompts = PromptSet(task.answer_instruction)
    sampling = SamplingParams.from_config(config.sampling)
    engine = make_engine(config.model)
    torch.set_num_threads(cpus)

    # (b) the coordinator, society start-up included.
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    RayRuntime().debate(config, 0, "finetune", problems, str(work / "debate"))
    coordinator_s = time.perf_counter() - t
    ray.shutdown()
    table = read_records(work / "debate")
    conversations = table.column("messages").to_pylist()

    # (c) the raw engine on the same conversations, in large batches.
    t = time.perf_counter()
    engine.generate(conversations, sampling)
    raw_engine_s = time.perf_counter() - t

    # (a) the authors' sequential loop, batch 1.
    t = time.perf_counter()
    calls = sequential(engine, problems, prompts, args.agents, args.rounds, sampling)
    sequential_s = time.perf_counter() - t

    result = {
        "benchmark": "debate_throughput", "problems": len(problems), "agents": args.agents,
        "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "sequences": len(conversations),
        "sequential_calls": calls, "sequential_s": round(sequential_s, 2),
        "coordinator_s": round(coordinator_s, 2), "raw_engine_s": round(raw_engine_s, 2),
        "speedup": round(sequential_s / coordinator_s, 2),
        "engine_efficiency": round(raw_engine_s / coordinator_s, 3),
        "machine": f"{platform.machine()} {cpus} CPUs, torch {torch.__version__}, no GPU",
        "model": "tiny random Llama (2 layers, hidden 64, character tokenizer)",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
