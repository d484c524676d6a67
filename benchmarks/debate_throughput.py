"""Debate throughput on the built-in real model: the authors' sequential loop vs the Ray coordinator vs
the raw engine, for the HF and vLLM engines.

    python benchmarks/debate_throughput.py [--problems 200] [--sequential-problems 20] [--max-new-tokens 32]
                                           [--engines vllm] [--sequential-dtype auto]

- sequential: problem -> round -> agent, batch-1 HF generation (the authors' code structure), in-process.
  It is linear in the problems by construction: timed on ``--sequential-problems`` and scaled to
  ``--problems`` (the JSON says so). Its precision, ``--sequential-dtype`` (also the hf runs'), is the HF
  engine's own by default, float32 on CPU; on a CPU with native bf16 vLLM serves in bfloat16, and
  ``--sequential-dtype bfloat16`` times the loop in that precision too. ``--engines none`` times only this
  loop.
- coordinator (per engine): the same 3-agent, 2-round debate through Ray actors (one shared engine given
  every CPU, shards pipelined), society start-up included.
- raw (per engine): the same debate in-process with no Ray, one batched engine call per turn kind (round 1;
  then per later round all summaries, then all critiques), engine start-up included as in the coordinator.

speedup = sequential_s / coordinator_s; efficiency = raw_s / coordinator_s. All runs share the model
(SmolLM2-135M-Instruct), problems (arithmetic a+b, 0..50), prompts and sampling settings. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

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


def raw_debate(engine, problems, prompts, agents, rounds, sampling) -> int:
    """The debate in-process, all problems at once: one generate call per turn kind and round."""
    from mft_ray.society.debate import TurnBatch, critic_messages, round1_messages, summary_messages

    questions = [p.question for p in problems]
    k = len(questions)
    calls = [0]

    def batched(per_agent):  # one call for every agent's conversations, split back per agent
        flat = [c for msgs in per_agent for c in msgs]
        calls[0] += 1
        replies = engine.generate(flat, sampling.derive("raw", calls[0]))
        return [replies[n * k:(n + 1) * k] for n in range(agents)], len(flat)

    msgs = [round1_messages(questions, prompts) for _ in range(agents)]
    replies, sequences = batched(msgs)
    prev = [TurnBatch(m, r) for m, r in zip(msgs, replies)]
    for _ in range(2, rounds + 1):
        summaries, n_s = batched([summary_messages(questions, prev, n, prompts) for n in range(agents)])
        c_msgs = [critic_messages(prev[n], summaries[n], prompts, summarized=True) for n in range(agents)]
        critiques, n_c = batched(c_msgs)
        prev = [TurnBatch(m, r) for m, r in zip(c_msgs, critiques)]
        sequences += n_s + n_c
    return sequences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--sequential-problems", type=int, default=20)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--engines", default="vllm", help="comma-separated: vllm, hf (the HF engine's coordinator "
                    "and raw runs are slow on CPU: ~20 min each at 200 problems on 2 cores), or none")
    ap.add_argument("--sequential-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the HF engine's precision, in the authors' loop and the hf runs (auto: the HF engine's "
                    "own, float32 on CPU)")
    args = ap.parse_args()
    engines = [] if args.engines == "none" else args.engines.split(",")
    if any(e not in ("vllm", "hf") for e in engines) or args.sequential_problems < 1:
        ap.error(f"--engines takes vllm and/or hf, or none (got {args.engines!r}); --sequential-problems >= 1")

    import ray
    import torch

    from actors.runtime import RayRuntime
    from mft_ray.config import load_config
    from mft_ray.engines import SamplingParams
    from mft_ray.engines.factory import make_engine
    from mft_ray.engines.vllm import auto_dtype
    from mft_ray.models.builtin import resolve_model_path
    from mft_ray.society.prompts import PromptSet
    from mft_ray.tasks import make_splits, make_task

    work = Path(tempfile.mkdtemp(prefix="mft-bench-"))
    model = resolve_model_path("builtin:smollm2-135m-instruct")
    cpus = os.cpu_count() or 2
    torch.set_num_threads(cpus)

    def config_for(engine: str, dtype: str = "auto"):
        return load_config(None, [
            f"run_dir={work / engine}", f"model.path={model}", f"model.engine={engine}", f"model.dtype={dtype}",
            "task.name=arithmetic",
            "task.form=a+b", "task.max_int=50", f"task.finetune_size={args.problems}", "task.eval_size=0",
            f"debate.agents={args.agents}", f"debate.rounds={args.rounds}", f"debate.shard_size={args.shard_size}",
            f"sampling.max_new_tokens={args.max_new_tokens}", "resources.share_engine=true",
            f"resources.num_cpus_per_agent={cpus}", "model.max_batch_size=64", "model.max_model_len=2048",
            "model.kv_cache_gb=1",
        ])

    # vLLM serves in its dtype="auto" (bfloat16 on a CPU with native bf16); the HF engine in --sequential-dtype.
    hf_dtype = "float32" if args.sequential_dtype == "auto" else args.sequential_dtype
    label = f"SmolLM2-135M-Instruct (builtin; vLLM {auto_dtype(False)}, HF {hf_dtype})"
    result: dict = {"benchmark": "debate_throughput", "model": label, "hf_dtype": hf_dtype,
                    "problems": args.problems, "agents": args.agents, "rounds": args.rounds,
                    "max_new_tokens": args.max_new_tokens,
                    "sequences": args.problems * args.agents * (2 * args.rounds - 1), "engines": {}}
    config = config_for("hf", hf_dtype)
    task = make_task(config.task)
    problems = make_splits(task, config.task).finetune
    prompts = PromptSet(task.answer_instruction)
    sampling = SamplingParams.from_config(config.sampling)

    # (a) the authors' loop: batch-1 HF generate on a subset, scaled.
    hf = make_engine(config.model)
    subset = problems[:args.sequential_problems]
    t = time.perf_counter()
    calls = sequential(hf, subset, prompts, args.agents, args.rounds, sampling)
    result["sequential_timed_s"] = round(time.perf_counter() - t, 2)
    hf.close()
    result["sequential_timed_problems"] = len(subset)
    result["sequential_s"] = round(result["sequential_timed_s"] * len(problems) / len(subset), 2)
    result["sequential_calls_timed"] = calls
    result["sequential_note"] = (f"timed on the first {len(subset)} problems and scaled to {len(problems)} "
                                 "(the loop is linear in the problems)")

    if engines:  # after the loop, which needs no Ray: its start-up would share the timed seconds
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    for name in engines:
        config = config_for(name, hf_dtype if name == "hf" else "auto")

        t = time.perf_counter()
        RayRuntime().debate(config, 0, "finetune", problems, str(work / name / "debate"))
        coordinator_s = time.perf_counter() - t

        t = time.perf_counter()
        engine = make_engine(config.model)
        load_s = time.perf_counter() - t
        sequences = raw_debate(engine, problems, prompts, args.agents, args.rounds, sampling)
        raw_s = time.perf_counter() - t

        engine.close()
        assert sequences == result["sequences"], (sequences, result["sequences"])
        result["engines"][name] = {"coordinator_s": round(coordinator_s, 2), "raw_s": round(raw_s, 2),
                                   "raw_load_s": round(load_s, 2)}
    if engines:
        ray.shutdown()
    for figures in result["engines"].values():
        figures["speedup"] = round(result["sequential_s"] / figures["coordinator_s"], 2)
        figures["efficiency"] = round(figures["raw_s"] / figures["coordinator_s"], 3)
    result["machine"] = describe_machine()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
