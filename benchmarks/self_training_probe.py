"""Can a model improve by finetuning on its own majority-consistent answers? A quick probe.

    python benchmarks/self_training_probe.py [--config jobs/configs/demo_cpu.yaml] [--lr 3e-5,1e-4,3e-4]
        [--epochs 2] [--batch-size 16] [--problems 300] [--pool] [--oracle]

Multiagent finetuning only helps if training a model on (mostly right) answers it sampled itself makes
its next samples better. This measures that in minutes, without Ray or the debate, for any model a
config names (e.g. a testbed candidate): sample ``--samples`` round-1 answers to each finetuning
problem under the config's sampling settings, keep the first sample's replies that agree with their
majority vote (no labels; ``--pool`` keeps every sample's, ``--oracle`` keeps the right ones instead,
an upper bound), finetune a copy of the model on them with plain torch AdamW (the trainer's loss mask:
reply tokens only, the model's chat template) at each learning rate, and measure single-sample,
majority-of-samples and greedy accuracy on ``--problems`` evaluation problems before and after, and
the share of replies in the testbed's hasty style with each style's accuracy.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_ray.config import load_config
    from mft_ray.engines import SamplingParams
    from mft_ray.engines.factory import make_engine
    from mft_ray.models.builtin import resolve_model_path
    from mft_ray.models.testbed import is_hasty
    from mft_ray.society.debate import round1_messages
    from mft_ray.society.prompts import PromptSet
    from mft_ray.society.voting import majority_vote, vote_rng
    from mft_ray.tasks.registry import make_task
    from mft_ray.tasks.splits import make_splits
    from mft_ray.training.tokenize import collate, encode_example

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/demo_cpu.yaml")
    parser.add_argument("--lr", default="3e-5,1e-4,3e-4", help="comma-separated learning rates")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--problems", type=int, default=300, help="evaluation problems measured")
    parser.add_argument("--pool", action="store_true", help="train on every sample's agreeing replies")
    parser.add_argument("--oracle", action="store_true", help="keep right replies (uses labels: an upper bound)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(cfg.seed)

    task = make_task(cfg.task)
    splits = make_splits(task, cfg.task)
    evals = splits.eval[: args.problems]
    prompts = PromptSet(task.answer_instruction)
    train_convs = round1_messages([p.question for p in splits.finetune], prompts)
    eval_convs = round1_messages([p.question for p in evals], prompts)
    base_sampling = SamplingParams.from_config(cfg.sampling)
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=cfg.sampling.max_new_tokens)

    def measure(model_dir: str) -> dict:
        engine = make_engine(cfg.model, model_dir)
        raw = [engine.generate(eval_convs, base_sampling.derive("probe-eval", k)) for k in range(args.samples)]
        samples = [[task.extract_answer(t) for t in r] for r in raw]
        # The testbed's hasty habit (steps ended with "; "): whether self-training drops it, and what
        # each style is worth. Meaningless (0 hasty) for other models.
        hasty = [is_hasty(t) for r in raw for t in r]
        right = [task.is_correct(a, p.answer) for s in samples for a, p in zip(s, evals)]
        votes = [majority_vote([s[i] for s in samples], task.equivalent, vote_rng(cfg.seed, p.id))
                 for i, p in enumerate(evals)]
        best = [task.extract_answer(t) for t in engine.generate(eval_convs, greedy)]
        n = len(evals)
        return {
            "single": round(sum(right) / len(right), 4),
            "majority": round(sum(task.is_correct(v.answer, p.answer) for v, p in zip(votes, evals)) / n, 4),
            "greedy": round(sum(task.is_correct(g, p.answer) for g, p in zip(best, evals)) / n, 4),
            "hasty_share": round(sum(hasty) / len(hasty), 4),
            "hasty_right": round(sum(r for r, h in zip(right, hasty) if h) / max(1, sum(hasty)), 4),
            "careful_right": round(sum(r for r, h in zip(right, hasty) if not h) / max(1, hasty.count(False)), 4),
        }

    path = resolve_model_path(cfg.model.path)
    result: dict = {"model": cfg.model.path, "temperature": cfg.sampling.temperature, "eval_problems": len(evals),
                    "pool": args.pool, "oracle": args.oracle, "epochs": args.epochs, "batch_size": args.batch_size}
    result["before"] = measure(str(path))

    # The finetuning set, built once from the base model's own samples.
    engine = make_engine(cfg.model, path)
    texts = [engine.generate(train_convs, base_sampling.derive("probe-train", k)) for k in range(args.samples)]
    del engine
    examples, right = [], 0
    for i, problem in enumerate(splits.finetune):
        answers = [task.extract_answer(t[i]) for t in texts]
        target = problem.answer if args.oracle else majority_vote(answers, task.equivalent,
                                                                  vote_rng(cfg.seed, problem.id)).answer
        for k in range(args.samples if args.pool else 1):
            if target is not None and answers[k] is not None and task.equivalent(answers[k], target):
                examples.append([*train_convs[i], {"role": "assistant", "content": texts[k][i]}])
                right += task.is_correct(answers[k], problem.answer)
    result["examples"] = len(examples)
    result["examples_right"] = round(right / max(1, len(examples)), 4)

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = [e for c in examples if (e := encode_example(tokenizer, c, cfg.finetune.generator.max_length))]
    result["after"] = {}
    for lr in [float(x) for x in args.lr.split(",")]:
        model = AutoModelForCausalLM.from_pretrained(path)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        order, start = random.Random(cfg.seed), time.perf_counter()
        for _ in range(args.epochs):
            order.shuffle(encoded)
            for b in range(0, len(encoded), args.batch_size):
                model(**collate(encoded[b: b + args.batch_size], tokenizer.pad_token_id)).loss.backward()
                opt.step()
                opt.zero_grad()
        train_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            result["after"][str(lr)] = {**measure(tmp), "train_s": round(train_s, 1)}
        print(json.dumps({"lr": lr, **result["after"][str(lr)]}), flush=True)
    result["machine"] = describe_machine()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
