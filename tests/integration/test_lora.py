"""A LoRA society (``finetune.adapter: lora``): every agent is the frozen base model plus its own adapter.

Without Ray: the config and training spec, the engine plan (one engine for a whole LoRA society), the
HF engine answering each row with its own adapter. On real Ray + Ray Train: one iteration of the real model
(the built-in SmolLM2-135M-Instruct on the vLLM engine, the shipped smollm2_cpu.yaml) with 2 agents, their
adapters trained together in one Ray Train run over one copy of the base; the adapters differ from each
other and from the base, one vLLM engine serves the whole society, and one agent is exported as a merged
checkpoint. Resuming a killed adapter training is tested in tests/integration/test_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from mft_ray.config import load_config
from mft_ray.engines.base import SamplingParams
from mft_ray.errors import ConfigError, EngineError
from mft_ray.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base, split_weights
from mft_ray.society.members import plan_engines, society_members
from mft_ray.training.export import checkpoint_problem
from tests.conftest import REPO, random_adapters

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


def test_the_frozen_base_is_in_the_full_finetunes_precision_unless_set():
    import torch

    from mft_ray.training.joint_lora import base_dtype

    assert base_dtype("auto", False) == torch.float32  # finetune.bf16 off: CPUs by default
    assert base_dtype("auto", True) == torch.bfloat16  # GPUs by default
    assert base_dtype("bfloat16", False) == torch.bfloat16 and base_dtype("float32", True) == torch.float32


def test_lora_settings_reach_the_training_spec_and_survive_ray_trains_loop_config():
    from mft_ray.training.loop import _fingerprint
    from mft_ray.training.spec import FinetuneJob, LoraSpec, training_spec

    config = load_config(None, ["finetune.adapter=lora", "finetune.zero_stage=2", "finetune.lora.rank=4",
                                "finetune.lora.target_modules=[q_proj,k_proj,v_proj]"])
    spec = training_spec(config, "generator", 2, 0)
    assert spec.lora == LoraSpec(rank=4, alpha=16.0, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj"))
    # An adapter trains at 10x the role's rate by default (later_learning_rate from iteration 2 on).
    assert spec.learning_rate == pytest.approx(10 * config.finetune.later_learning_rate)
    assert training_spec(config, "critic", 1, 0).learning_rate == pytest.approx(10 * config.finetune.critic.learning_rate)
    unscaled = load_config(None, ["finetune.adapter=lora", "finetune.zero_stage=2", "finetune.lora.lr_scale=1"])
    assert training_spec(unscaled, "generator", 1, 0).learning_rate == unscaled.finetune.generator.learning_rate
    with pytest.raises(ConfigError, match=r"finetune.lora.lr_scale must be > 0"):
        load_config(None, ["finetune.adapter=lora", "finetune.zero_stage=2", "finetune.lora.lr_scale=0"])
    job = FinetuneJob("generator_0", "/base", "/data.jsonl", "/out", spec, iteration=2, init_adapter="/it1/gen0")
    assert FinetuneJob.from_loop_config(job.to_loop_config()) == job
    assert training_spec(load_config(None, []), "generator", 1, 0).lora is None  # full finetuning by default
    with pytest.raises(ConfigError, match="adapter=lora needs finetune.zero_stage <= 2"):
        load_config(None, ["finetune.adapter=lora"])  # ZeRO-3 is the default
    with pytest.raises(ConfigError, match="finetune.adapter must be one of"):
        load_config(None, ["finetune.adapter=qlora"])
    assert spec.lora.base_dtype == "auto"
    with pytest.raises(ConfigError, match=r"finetune.lora.base_dtype must be one of"):
        load_config(None, ["finetune.adapter=lora", "finetune.zero_stage=2", "finetune.lora.base_dtype=fp8"])
    with pytest.raises(ConfigError, match=r"applies to adapters trained together"):  # DeepSpeed's precision rules
        load_config(None, ["finetune.adapter=lora", "finetune.zero_stage=2", "finetune.adapters_together=false",
                           "finetune.lora.base_dtype=bfloat16"])
    # A training-state checkpoint resumes only the same adapter training: same LoRA shape, same starting adapter.
    lora = dataclasses.replace(job, data_path=__file__)
    assert _fingerprint(lora, 10, 1) != _fingerprint(dataclasses.replace(lora, init_adapter=None), 10, 1)
    assert _fingerprint(lora, 10, 1) != _fingerprint(dataclasses.replace(lora, spec=dataclasses.replace(
        spec, lora=None)), 10, 1)
    # base_dtype came later: at "auto" a spec hashes as before it existed (older checkpoints still resume).
    from mft_ray.training.spec import hashed_spec

    hashed = hashed_spec(dataclasses.asdict(spec))
    assert hashed["lora"] == {k: v for k, v in dataclasses.asdict(spec)["lora"].items() if k != "base_dtype"}
    bf16 = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, base_dtype="bfloat16"))
    assert hashed_spec(dataclasses.asdict(bf16))["lora"]["base_dtype"] == "bfloat16"
    assert _fingerprint(lora, 10, 1) != _fingerprint(dataclasses.replace(lora, spec=bf16), 10, 1)


def test_adapters_trained_together_take_turns_each_on_its_own_batches():
    from mft_ray.training.joint_lora import schedule

    order = schedule({"generator_0": 10, "critic_0": 4}, {"generator_0": 4, "critic_0": 4},
                     {"generator_0": 2, "critic_0": 1}, world=1)
    # Epoch by epoch, the agents in turn; an agent with fewer epochs (or batches) drops out of the rotation.
    assert order == [("generator_0", 0, 0), ("critic_0", 0, 0), ("generator_0", 0, 1), ("generator_0", 0, 2),
                     ("generator_0", 1, 0), ("generator_0", 1, 1), ("generator_0", 1, 2)]
    two = schedule({"generator_0": 10, "critic_0": 4}, {"generator_0": 4, "critic_0": 4},
                   {"generator_0": 1, "critic_0": 1}, world=2)  # each rank takes half of every agent's examples
    assert two == [("generator_0", 0, 0), ("critic_0", 0, 0), ("generator_0", 0, 1)]


def test_one_engine_serves_a_whole_lora_society_when_engines_are_shared(tmp_path):
    adapters = {}
    for name in ("generator_0", "generator_1", "critic_0", "critic_1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "/models/base", "r": 8}))
        adapters[name] = str(tmp_path / name)
    members = society_members(2, True)
    paths = {m: adapters.get(str(m), "/models/base") for m in members}
    (group,) = plan_engines(members, paths, True, split_weights)
    assert group.model_path == "/models/base" and group.members == members
    assert {str(m): a for m, a in group.adapters.items()} == adapters  # the summarizer is the base itself
    separate = plan_engines(members, paths, False, split_weights)
    assert len(separate) == 5 and all(g.model_path == "/models/base" for g in separate)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(ConfigError, match="names no base model"):
        adapter_base(tmp_path / "broken")


def test_hf_engine_answers_each_row_with_its_own_adapter(testbed_mini, tmp_path_factory):
    from mft_ray.engines.hf import HFEngine

    # Large random B matrices: on this small model each adapter then changes the greedy reply itself.
    adapters = random_adapters(testbed_mini, tmp_path_factory.mktemp("adapters"), 2, scale=0.5)
    plain = HFEngine(testbed_mini)
    engine = HFEngine(testbed_mini, adapters=adapters)
    rows = [None, *adapters, None]
    mixed = engine.generate([QUESTION] * 4, GREEDY, rows)
    base = plain.generate([QUESTION], GREEDY)[0]
    assert mixed[0] == mixed[3] == base  # rows without an adapter: the base model, untouched
    assert len(set(mixed[:3])) == 3  # each adapter answers differently
    alone = [engine.generate([QUESTION], GREEDY, [a])[0] for a in adapters]
    assert mixed[1:3] == alone
    assert engine.score([QUESTION], ["3 + 4 = 7"]) == pytest.approx(plain.score([QUESTION], ["3 + 4 = 7"]))
    assert engine.score([QUESTION], ["3 + 4 = 7"], adapters[0]) != engine.score([QUESTION], ["3 + 4 = 7"])
    with pytest.raises(EngineError, match="not built with the LoRA adapter"):
        engine.generate([QUESTION], GREEDY, ["/not/loaded"])
    with pytest.raises(EngineError, match="not built with the LoRA adapter"):
        plain.generate([QUESTION], GREEDY, [adapters[0]])


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _agent_processes(raylet: int) -> int:
    """Live agent-actor processes of this Ray instance (Ray titles them ``ray::AgentActor...``; its raylet
    starts them), once the killed actors of earlier societies are gone (waited for up to 30 s). Another
    test worker's Ray instance on this machine has its own raylet."""
    deadline = time.time() + 30
    while True:
        count = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                mine = _ppid(int(pid)) == raylet
            except (OSError, IndexError, ValueError):
                continue
            count += title.startswith(b"ray::AgentActor") and state not in ("Z", "X") and mine
        if count <= 1 or time.time() > deadline:
            return count
        time.sleep(0.5)


def _lora_weights(adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / ADAPTER_WEIGHTS))


@pytest.fixture(scope="module")
def smollm2() -> str:
    from mft_ray.models.builtin import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


@pytest.mark.integration
def test_a_lora_society_of_the_real_model_finetunes_and_debates_on_one_vllm_engine(ray_cluster, smollm2, tmp_path):
    import ray

    from actors.group import SocietyGroup
    from jobs.cli import main as mft
    from jobs.iterate import main as iterate
    from mft_ray.engines.hf import HFEngine
    from mft_ray.run.records import read_records
    from mft_ray.run.rundir import RunDir

    run_dir = tmp_path / "run"
    # The shipped real-model config, shrunk: 2 agents, 4 + 2 problems, short replies, one iteration.
    config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", [
        f"run_dir={run_dir}", "finetune.iterations=1", "debate.agents=2", "task.finetune_size=4",
        "task.eval_size=2", "debate.shard_size=4", "sampling.max_new_tokens=40", "finetune.adapter=lora",
        "finetune.lora.rank=4", "finetune.generator.learning_rate=1e-4", "finetune.critic.learning_rate=1e-4",
        "finetune.generator.max_length=384", "finetune.critic.max_length=768", "model.max_model_len=1024",
        "model.kv_cache_gb=0.25", "metrics.embedding=false", "metrics.nll_problems=0"])
    assert config.model.engine == "vllm"
    summary = iterate(config)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]

    run = RunDir(run_dir)
    society = run.read_society(1)
    finetunes = json.loads(run.finetunes_path(1).read_text())
    # Joint training needs two or more sets; with 2 agents debating 4 problems every set so far had examples.
    assert len(finetunes) >= 2 and set(finetunes) <= set(society), finetunes
    # One Ray Train run trained every adapter over one copy of the base (mft_ray.training.joint_lora).
    assert all(m["adapters_together"] == len(finetunes) for m in finetunes.values()), finetunes
    weights = {}
    for name in finetunes:  # every trained agent is an adapter of the base: a few files, whole, loss fell
        adapter = society[name]
        assert adapter == str(run.agent_dir(1, name)) and checkpoint_problem(adapter) is None
        assert adapter_base(adapter) == smollm2 and not (Path(adapter) / "config.json").exists()
        assert finetunes[name]["loss_after"] < finetunes[name]["loss_before"], finetunes[name]
        weights[name] = _lora_weights(adapter)
        # A new adapter's B is zero (the base model); training moved it.
        assert any(t.abs().max() > 0 for k, t in weights[name].items() if "lora_B" in k), name
    names = sorted(weights)
    for i, a in enumerate(names):  # each agent learnt its own adapter from its own data
        for b in names[i + 1:]:
            assert any((weights[a][k] - weights[b][k]).abs().max() > 0 for k in weights[a]), (a, b)

    # Society 1 on one vLLM engine: one agent actor, holding every trained member's adapter.
    with SocietyGroup(config, {m: society[str(m)] for m in society_members(2, True) if str(m) in society},
                      name="lora-society") as group:
        info = ray.get(group.actors[0].info.remote())
        assert len(group.actors) == 1 and _agent_processes(_ppid(info["pid"])) == 1
        assert info["model_path"] == smollm2 and set(info["adapters"]) == set(finetunes)
        assert info["engine"] == "VLLMEngine"
        out = tmp_path / "debate"
        stats = ray.get(group.async_debate(1, "eval", [("p0", "What is 2 + 3?"), ("p1", "What is 4 + 4?")],
                                           str(out)))
    assert stats["shards"] == 1
    records = read_records(out).to_pylist()
    assert {(r["role"], r["agent"]) for r in records} == {(role, n) for role in ("generator", "critic", "summarizer")
                                                          for n in range(2)}
    # The evaluation debate of iteration 1 ran on the adapters too: it is on disk, complete.
    assert len({r["problem_id"] for r in read_records(run.debate_dir(1, "eval")).to_pylist()}) == 2

    # `mft export` merges one agent into a full checkpoint that answers as base + adapter does.
    member = names[0]
    merged = tmp_path / f"{member}-merged"
    export = ["export", "--run-dir", str(run_dir), "--iteration", "1", "--member", member, "--out", str(merged)]
    assert mft(export) == 0
    assert checkpoint_problem(merged, require_metrics=False) is None
    completion = ["2 + 3 = 5"]
    full = HFEngine(str(merged)).score([QUESTION], completion)
    adapted = HFEngine(smollm2, adapters=[society[member]]).score([QUESTION], completion, society[member])
    # Merging adds B @ A into 30 layers' float32 weights: rounding moves the NLL by ~1e-4 relative.
    assert full == pytest.approx(adapted, rel=1e-3)
    assert mft(export) == 2  # never over an existing directory
