"""Wall time of an iteration's 2N = 6 finetunes three ways: in lanes (as jobs.iterate launches them: as many
Ray Train runs at once as fit, each training its share one after another), one Ray Train run per finetune
with as many at once as fit (how jobs.iterate launched them before lanes), and one run per finetune one after
another; and the per-finetune overhead of Ray Train + DeepSpeed over a plain torch loop.

    python benchmarks/finetune_concurrency.py [--examples 64] [--epochs 1]

All runs finetune the same tiny Llama (built locally) on the same generated debate conversations with
the same batch size, epochs and learning rate. The last line printed is one JSON object.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mft_ray.training.spec import TrainingSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_torch(model_dir: str, data: str, spec: TrainingSpec) -> float:
    """The same training with a bare torch loop: no Ray, no DeepSpeed, no distributed setup."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_ray.training.loop import read_examples
    from mft_ray.training.tokenize import collate, encode_example

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [e for e in (encode_example(tok, ex["messages"], spec.max_length) for ex in read_examples(data)) if e]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    model.train()
    for epoch in range(spec.epochs):
        random.Random(epoch).shuffle(encoded)
        for i in range(0, len(encoded), spec.batch_size):
            loss = model(**collate(encoded[i:i + spec.batch_size], tok.pad_token_id)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(Path(tempfile.mkdtemp()) / "plain")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--cpus-per-worker", type=float, default=0.5, help="as in jobs/configs/tiny_cpu.yaml")
    args = ap.parse_args()

    import ray

    from actors.finetune import _fit, run_finetunes
    from mft_ray.models.testbed import ARITH_INSTRUCTION, MINI_TESTBED, debate_conversations
    from mft_ray.models.tiny import build_tiny_llama
    from mft_ray.society.prompts import PromptSet
    from mft_ray.training.slots import concurrent_slots
    from mft_ray.training.spec import FinetuneJob, TrainingSpec

    work = Path(tempfile.mkdtemp(prefix="mft-ftbench-"))
    model = str(build_tiny_llama(work / "model"))
    rng = random.Random(0)
    rows = []
    while len(rows) < args.examples:
        for conv in debate_conversations(rng, MINI_TESTBED, PromptSet(ARITH_INSTRUCTION)):
            rows.append({"problem_id": str(len(rows)), "messages": conv})
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.examples]))
    spec = TrainingSpec(learning_rate=1e-3, epochs=args.epochs, batch_size=8, grad_accum=1, weight_decay=0.0,
                        warmup_ratio=0.0, max_length=1024, zero_stage=2, bf16=False, gradient_checkpointing=False,
                        trust_remote_code=False, seed=0, checkpoint_every_steps=0)
    names = [f"{r}_{n}" for r in ("generator", "critic") for n in range(args.agents)]

    def jobs(tag: str) -> list:
        return [FinetuneJob(n, model, str(data), str(work / tag / n), spec) for n in names]

    plain_s = plain_torch(model, str(data), spec)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run_finetunes(jobs("warmup")[:1], str(work / "ray_train"), cpus_per_worker=args.cpus_per_worker)  # DeepSpeed op load, worker start
    t = time.perf_counter()
    run_finetunes(jobs("lanes"), str(work / "ray_train"), cpus_per_worker=args.cpus_per_worker)
    lanes_s = time.perf_counter() - t
    slots = concurrent_slots(1, args.cpus_per_worker, 0.0, ray.cluster_resources())
    t = time.perf_counter()
    todo, pending = jobs("concurrent"), []
    while todo or pending:  # one run per finetune, a new one as each ends
        while todo and len(pending) < slots:
            job = todo.pop(0)
            pending.append(_fit.remote([job], 1, args.cpus_per_worker, 0.0, 0, str(work / "ray_train")))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    concurrent_s = time.perf_counter() - t
    t = time.perf_counter()
    for job in jobs("sequential"):
        run_finetunes([job], str(work / "ray_train"), cpus_per_worker=args.cpus_per_worker)
    sequential_s = time.perf_counter() - t
    ray.shutdown()

    per_finetune = sequential_s / len(names)
    print(json.dumps({
        "benchmark": "finetune_concurrency", "finetunes": len(names), "examples": args.examples,
        "epochs": args.epochs, "batch_size": spec.batch_size, "zero_stage": 2,
        "cpus_per_worker": args.cpus_per_worker, "at_once": min(slots, len(names)),
        "lanes_s": round(lanes_s, 2), "run_per_finetune_concurrent_s": round(concurrent_s, 2),
        "sequential_s": round(sequential_s, 2), "lanes_speedup_over_run_per_finetune": round(concurrent_s / lanes_s, 2),
        "concurrency_speedup": round(sequential_s / concurrent_s, 2), "plain_torch_s": round(plain_s, 2),
        "ray_deepspeed_per_finetune_s": round(per_finetune, 2),
        "overhead": round(per_finetune / plain_s, 2), "overhead_s": round(per_finetune - plain_s, 2),
        "machine": describe_machine(),
        "model": "tiny random Llama (2 layers, hidden 64, character tokenizer)",
    }))


if __name__ == "__main__":
    main()
