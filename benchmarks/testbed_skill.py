"""How good is a built-in model (the CPU testbed, SmolLM2)? Build time and single-answer skill on the evaluation split.

    python benchmarks/testbed_skill.py [--config jobs/configs/demo_cpu.yaml] [--samples 3] [--rebuild] [key=value ...]

Builds ``model.path`` (a ``builtin:`` model; timed, unless it is cached and --rebuild is not given),
then asks every evaluation problem of the config's task ``--samples`` times with the round-1 generator
prompt, under the config's sampling settings and greedily, with the HF engine. Reports single-sample
accuracy ± standard error (the testbed's target is 30%-70%), greedy accuracy, parse rate, how varied the
wrong answers are, which rule read the answers (``tasks.answers``), and majority-of-samples accuracy. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from mft_ray.config import BUILTIN_PREFIX, load_config
    from mft_ray.engines import SamplingParams
    from mft_ray.engines.factory import make_engine
    from mft_ray.metrics.accuracy import accuracy_with_stderr
    from mft_ray.models.builtin import builtin_model_dir, resolve_model_path
    from mft_ray.society.debate import round1_messages
    from mft_ray.society.prompts import PromptSet
    from mft_ray.society.voting import majority_vote, vote_rng
    from mft_ray.tasks.registry import make_task
    from mft_ray.tasks.splits import make_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/demo_cpu.yaml")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="delete the cached model and time a build")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. task.form=a*b")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    name = cfg.model.path.removeprefix(BUILTIN_PREFIX)
    cached = builtin_model_dir(name)
    if args.rebuild and cached.exists():
        shutil.rmtree(cached)
    was_cached = (cached / "config.json").is_file()
    start = time.perf_counter()
    path = resolve_model_path(cfg.model.path)
    build_s = None if was_cached else round(time.perf_counter() - start, 1)

    task = make_task(cfg.task)
    problems = make_splits(task, cfg.task).eval
    prompts = PromptSet(task.answer_instruction)
    convs = round1_messages([p.question for p in problems], prompts)
    engine = make_engine(cfg.model, path)
    base = SamplingParams.from_config(cfg.sampling)
    start = time.perf_counter()
    parsed = [[task.parse_answer(t) for t in engine.generate(convs, base.derive("skill", k))]
              for k in range(args.samples)]
    samples = [[a.answer for a in s] for s in parsed]
    gen_s = time.perf_counter() - start
    greedy = [task.extract_answer(t) for t in engine.generate(convs, SamplingParams(
        temperature=0.0, top_p=1.0, max_new_tokens=cfg.sampling.max_new_tokens))]

    single = [task.is_correct(s[i], p.answer) for s in samples for i, p in enumerate(problems)]
    acc, se = accuracy_with_stderr(single)
    wrong = [s[i] for s in samples for i, p in enumerate(problems) if not task.is_correct(s[i], p.answer)]
    votes = [majority_vote([s[i] for s in samples], task.equivalent, vote_rng(cfg.seed, p.id))
             for i, p in enumerate(problems)]
    majority = [task.is_correct(v.answer, p.answer) for v, p in zip(votes, problems)]
    result = {
        "model": cfg.model.path, "task": cfg.task.name, "form": cfg.task.form if cfg.task.name == "arithmetic" else None,
        "max_int": cfg.task.max_int if cfg.task.name == "arithmetic" else None, "build_s": build_s, "was_cached": was_cached, "eval_problems": len(problems), "samples": args.samples,
        "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
        "single_accuracy": round(acc, 4), "single_stderr": round(se, 4),
        "greedy_accuracy": round(sum(task.is_correct(g, p.answer) for g, p in zip(greedy, problems))
                                 / len(problems), 4),
        "parse_rate": round(sum(a is not None for s in samples for a in s) / len(single), 4),
        # Varied errors: share of wrong answers that are unique among the wrong answers to their problem.
        "distinct_wrong_share": round(len(set(wrong)) / max(1, len(wrong)), 4),
        "most_common_wrong": Counter(wrong).most_common(3),
        "answer_rules": dict(Counter(str(a.rule) for s in parsed for a in s)),
        f"majority_of_{args.samples}_accuracy": round(sum(majority) / len(problems), 4),
        "all_samples_agree": round(sum(v.consensus == 1.0 for v in votes) / len(problems), 4),
        "generate_s_per_sample_pass": round(gen_s / args.samples, 1),
        "machine": describe_machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
