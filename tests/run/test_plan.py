"""The resource plan (mft_ray.run.plan), its refusals in the driver's preflight and `mft plan`: every shipped
config against a described 8 x H100 (80 GB) node, the memory formula, and the configs that must be refused."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from jobs import cli
from mft_ray.config import load_config
from mft_ray.errors import ConfigError
from mft_ray.run.plan import (
    GIB,
    ClusterSpec,
    ModelShape,
    checkpoint_shape,
    finetune_memory_gb,
    job_memory_gb,
    lora_parameters,
    model_shape,
    resource_plan,
)
from mft_ray.run.preflight import check_config, check_resources
from mft_ray.training.spec import FinetuneJob, training_spec
from tests.conftest import REPO

CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
LLAMA = [c for c in CONFIGS if c.name.startswith("llama3_8b_")]
LLAMA3 = str(REPO / "jobs/configs/llama3_8b_3agents.yaml")
H100_NODE = ClusterSpec(nodes=1, gpus_per_node=8, gpu_memory_gb=80.0, cpus_per_node=192)  # a p5.48xlarge
# SmolLM2-135M's config.json (the built-in real model), the fields the count reads: its cache may not be built yet.
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                "vocab_size": 49152, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
# Llama-3-8B's config.json, the fields the count reads.
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
             "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}


@pytest.fixture(autouse=True)
def _quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import common

    monkeypatch.setattr(common, "setup_logging", lambda: None)


def test_shipped_configs_include_both_gpu_configs() -> None:
    assert {c.name for c in LLAMA} == {"llama3_8b_3agents.yaml", "llama3_8b_5agents.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_plans_without_problems_on_8_h100(path: Path) -> None:
    config = load_config(path)
    plan = resource_plan(config, H100_NODE)
    assert plan.problems == [], plan.format()
    assert plan.societies and all(s.fits for s in plan.societies), plan.format()
    check_resources(config)  # the preflight's part of the plan refuses nothing either
    if plan.finetune is not None:
        assert plan.finetune.at_once is not None and plan.finetune.at_once >= 1, plan.format()
    if config.resources.num_gpus_per_agent > 0:  # inference on GPUs: so is training
        assert plan.finetune is not None and plan.finetune.gpus_per_worker > 0


@pytest.mark.parametrize("path", LLAMA, ids=[c.name for c in LLAMA])
def test_gpu_configs_train_8b_on_gpus_within_an_h100(path: Path) -> None:
    config = load_config(path)
    ft = config.finetune
    assert (ft.gpus_per_worker, ft.zero_stage, ft.bf16, ft.gradient_checkpointing) == (1, 3, True, True)
    assert ft.iterations >= 1 and ft.max_failures >= 1
    # The paper's hyperparameters (Phi-3's, used for Llama-3 too).
    assert (ft.generator.learning_rate, ft.generator.epochs, ft.generator.batch_size) == (5e-6, 2, 1)
    assert (ft.critic.learning_rate, ft.critic.epochs, ft.critic.batch_size) == (5e-7, 1, 1)
    assert (ft.later_learning_rate, ft.later_weight_decay) == (5e-7, 1e-3)
    plan = resource_plan(config, H100_NODE)
    memory = plan.finetune.memory_gb
    assert memory is not None and 20 < memory["total"] < 80, plan.format()
    assert plan.finetune.units == 2 * config.debate.agents
    # The header's launch command runs jobs.iterate with this very file.
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert re.search(rf"python -m jobs\.iterate --config jobs/configs/{path.name}", header), header


def test_parameter_count_from_a_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    (tmp_path / "model.safetensors").write_bytes(b"")
    shape = model_shape(load_config(None, [f"model.path={tmp_path}", "model.num_parameters=1.0"]))
    assert shape is not None and shape.source.startswith("config.json")  # the checkpoint wins
    assert abs(shape.parameters - 8.03e9) / 8.03e9 < 0.002, shape
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "tie_word_embeddings": True}))
    tied = model_shape(load_config(None, [f"model.path={tmp_path}"]))
    assert tied is not None and tied.parameters == shape.parameters - 128256 * 4096


def test_parameter_count_from_the_setting_or_unknown() -> None:
    shape = model_shape(load_config(LLAMA3))
    assert shape is not None and shape.parameters == 8.03e9 and "model.num_parameters" in shape.source
    config = load_config(LLAMA3, ["model.num_parameters=null"])
    assert model_shape(config) is None
    plan = resource_plan(config, H100_NODE)
    assert plan.finetune.memory_gb is None and plan.problems == []
    assert any("set model.num_parameters" in note for note in plan.notes)
    with pytest.raises(ConfigError, match=r"model\.num_parameters \(billions\) must be > 0 or null, got -1"):
        load_config(None, ["model.num_parameters=-1"])


def test_memory_formula_partitions_by_zero_stage() -> None:
    shape = ModelShape(1e9, 2048, 16, 32000, "test")
    by_stage = {z: finetune_memory_gb(shape, 4, z, True, True, 1, 1024) for z in (0, 1, 2, 3)}
    full = {"weights": 2e9 / GIB, "gradients": 2e9 / GIB, "AdamW": 12e9 / GIB}
    assert by_stage[0]["weights"] == full["weights"] and by_stage[0]["AdamW"] == full["AdamW"]
    assert by_stage[1]["AdamW"] == full["AdamW"] / 4 and by_stage[1]["gradients"] == full["gradients"]
    assert by_stage[2]["gradients"] == full["gradients"] / 4 and by_stage[2]["weights"] == full["weights"]
    assert by_stage[3]["weights"] == full["weights"] / 4
    fp32 = finetune_memory_gb(shape, 1, 0, False, True, 1, 1024)
    assert fp32["weights"] == 4e9 / GIB and fp32["AdamW"] == 8e9 / GIB  # no separate master copy
    without = finetune_memory_gb(shape, 4, 3, True, False, 1, 1024)
    assert without["activations"] > by_stage[3]["activations"]  # gradient checkpointing saves memory
    assert all(abs(m["total"] - sum(v for k, v in m.items() if k != "total")) < 1e-9 for m in by_stage.values())


def test_a_lora_finetune_trains_only_its_adapter_and_its_society_shares_one_engine() -> None:
    """An 8B finetune on one 80 GB GPU: refused in full (AdamW states of every weight), planned with LoRA (only
    the adapter's gradients and optimizer states); the finetuned LoRA society shares the base's engine."""
    full = load_config(LLAMA3, ["finetune.num_workers=1", "finetune.zero_stage=2"])
    with pytest.raises(ConfigError, match="a finetune needs an estimated"):
        check_resources(full)
    lora = load_config(LLAMA3, ["finetune.num_workers=1", "finetune.zero_stage=2", "finetune.adapter=lora",
                                "finetune.lora.rank=16"])
    check_resources(lora)
    shape = model_shape(lora)
    t = lora_parameters(shape, 16, ["q_proj", "v_proj"])
    assert t == shape.layers * 16 * 4 * shape.hidden and t < shape.parameters / 100
    alone = resource_plan(load_config(LLAMA3, ["finetune.num_workers=1", "finetune.zero_stage=2",
                                               "finetune.adapter=lora", "finetune.lora.rank=16",
                                               "finetune.adapters_together=false"])).finetune.memory_gb
    assert alone["AdamW"] == pytest.approx(t * 12 / GIB)
    assert alone["weights"] == pytest.approx(shape.parameters * 2 / GIB)
    memory = resource_plan(lora).finetune.memory_gb  # trained together: the 6 adapters' states in one worker
    assert memory["AdamW"] == pytest.approx(6 * t * 12 / GIB)
    assert memory["weights"] == alone["weights"]
    shared = load_config(LLAMA3, ["finetune.zero_stage=2", "finetune.adapter=lora", "resources.share_engine=true"])
    engines = {s.kind: s.engines for s in resource_plan(shared).societies}
    assert engines == {"iteration 0 (base model)": 1, "finetuned (iterations >= 1)": 1}
    full_shared = load_config(LLAMA3, ["finetune.zero_stage=2", "resources.share_engine=true"])
    assert {s.kind: s.engines for s in resource_plan(full_shared).societies}["finetuned (iterations >= 1)"] == 7


@pytest.mark.parametrize(("cluster", "overrides", "cpus"), [
    (ClusterSpec(1, 0, 80.0, 2), [], 2.0),                               # this laptop: both cores, as 2 lanes
    (ClusterSpec(1, 0, 80.0, 96), [], 6.0),                              # one lane per adapter, no more
    (ClusterSpec(1, 0, 80.0, 96), ["finetune.max_concurrent=2"], 2.0),   # the lanes the setting allows
    (ClusterSpec(4, 0, 80.0, 3), [], 3.0),                               # one worker lives on one node
    (ClusterSpec(1, 0, 80.0, 96), ["finetune.num_workers=2"], 1.0),      # several workers: as configured
])
def test_a_lora_societys_adapters_are_planned_as_one_run_with_the_lanes_cpus(cluster, overrides, cpus) -> None:
    """`mft plan` shows what actors.finetune.run_finetunes does with a LoRA society on CPUs: one Ray Train run
    per iteration, whose one worker takes the CPUs the separate finetunes' lanes would use."""
    config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", ["finetune.adapter=lora", *overrides])
    f = resource_plan(config, cluster).finetune
    assert f.together and f.at_once == 1 and f.worker_cpus == cpus, resource_plan(config, cluster).format()
    text = resource_plan(config, cluster).format()
    assert "6 LoRA adapters per iteration" in text and "trained together in one run" in text
    assert (f"takes {cpus:g} CPUs" in text) == (cpus != 1.0)
    alone = resource_plan(load_config(REPO / "jobs/configs/smollm2_cpu.yaml",
                                      ["finetune.adapter=lora", "finetune.adapters_together=false", *overrides]),
                          cluster).finetune
    assert not alone.together and alone.worker_cpus is None


@pytest.mark.parametrize(("method", "cluster", "overrides", "cpus"), [
    ("single_agent_ft", ClusterSpec(1, 0, 80.0, 2), [], 2.0),            # one model: one lane takes both cores
    ("majority_ft", ClusterSpec(1, 0, 80.0, 96), [], 96.0),              # every CPU of the node
    ("majority_ft", ClusterSpec(1, 0, 80.0, 96), ["finetune.max_concurrent=4"], 4.0),
    ("multiagent_ft", ClusterSpec(1, 0, 80.0, 2), [], None),             # 2 lanes of 6 finetunes: as configured
    ("multiagent_ft", ClusterSpec(1, 0, 80.0, 2, 7.0), ["model.num_parameters=0.135"], 2.0),  # memory: one lane
    ("single_agent_ft", ClusterSpec(1, 0, 80.0, 2), ["finetune.num_workers=2"], 1.0),  # 2 workers: as configured
])
def test_a_lone_cpu_lane_is_planned_with_the_cpus_of_every_lane(method, cluster, overrides, cpus) -> None:
    """`mft plan` shows what actors.finetune.run_finetunes does when an iteration's full finetunes run in one lane
    on CPUs: its one worker takes the CPUs the other lanes would have used."""
    config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", [f"method={method}", *overrides])
    f = resource_plan(config, cluster).finetune
    text = resource_plan(config, cluster).format()
    assert not f.together and f.worker_cpus == cpus, text
    assert ("one lane: its CPU worker takes" in text) == (cpus not in (None, 1.0)), text
    if cpus not in (None, 1.0):
        assert f"takes {cpus:g} CPUs" in text
    if cpus is not None:
        assert f.at_once == 1


def test_a_cpu_finetune_jobs_host_memory_is_the_formula_on_its_checkpoint(tmp_path: Path) -> None:
    """What actors.finetune caps its CPU lanes with: the formula, for the job's own spec and checkpoint."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", ["finetune.gradient_checkpointing=false",
                                                                    "finetune.critic.max_length=1024"])
    spec = training_spec(config, "critic", 1, 0)
    job = FinetuneJob("critic_0", str(tmp_path), "data.jsonl", str(tmp_path / "out"), spec)
    shape = checkpoint_shape(tmp_path)
    assert shape is not None and shape.layers == 32 and shape.vocab == 128256
    assert job_memory_gb(job, 1) == pytest.approx(finetune_memory_gb(shape, 1, 2, False, False, 8, 1024,
                                                                      gpu=False)["total"])
    checkpointed = dataclasses.replace(job, spec=dataclasses.replace(spec, gradient_checkpointing=True))
    assert job_memory_gb(checkpointed, 1) < job_memory_gb(job, 1) - 50  # 8B: the activations of 32 layers
    assert job_memory_gb(dataclasses.replace(job, init_path=str(tmp_path / "nowhere")), 1) is None


@pytest.mark.parametrize(("overrides", "memory_gb", "at_once"), [
    (["finetune.gradient_checkpointing=false", "finetune.critic.max_length=1024"], 16.2, 1),  # killed in 2 lanes
    ([], 16.2, 2),                                    # the shipped config: checkpointing, 640 tokens
    (["finetune.gradient_checkpointing=false", "finetune.critic.max_length=1024"], None, 2),  # memory unknown
])
def test_cpu_finetunes_at_once_fit_the_described_memory(tmp_path, overrides, memory_gb, at_once) -> None:
    """`mft plan --memory-gb-per-node` caps CPU lanes as actors.finetune does on a running cluster."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", [f"model.path={tmp_path}", *overrides])
    plan = resource_plan(config, ClusterSpec(1, 0, 80.0, 2, memory_gb))
    assert plan.finetune.at_once == at_once, plan.format()


def test_gpu_inference_with_cpu_finetunes_is_refused() -> None:
    config = load_config(LLAMA3, ["finetune.gpus_per_worker=0"])
    with pytest.raises(ConfigError) as info:
        check_config(config, endpoint=False)
    message = str(info.value)
    assert "resources.num_gpus_per_agent=0.5 runs inference on GPUs but finetune.gpus_per_worker=0 would train " \
           "each of the 6 finetunes per iteration on CPU" in message, message
    # Jobs that finetune nothing, no finetuning iterations, or an evaluation-only method: nothing to refuse.
    check_resources(config, finetunes=False)
    check_resources(load_config(LLAMA3, ["finetune.gpus_per_worker=0", "finetune.iterations=0"]))
    check_resources(load_config(LLAMA3, ["finetune.gpus_per_worker=0", "method=debate"]))


def test_a_finetune_over_the_gpu_memory_is_refused() -> None:
    config = load_config(LLAMA3, ["finetune.num_workers=1"])
    with pytest.raises(ConfigError, match=r"a finetune needs an estimated 1\d\d\.\d GiB per GPU \(ZeRO-3 over 1 "
                                          r"worker\(s\), bf16.*more than resources\.gpu_memory_gb=80; raise "
                                          r"finetune\.num_workers"):
        check_resources(config)
    check_resources(load_config(LLAMA3, ["finetune.num_workers=1", "resources.gpu_memory_gb=192"]))  # a bigger GPU
    with pytest.raises(ConfigError, match=r"more than resources\.gpu_memory_gb=40"):  # 4 workers on 40 GB A100s
        check_resources(load_config(LLAMA3, ["resources.gpu_memory_gb=40"]))
    check_resources(load_config(LLAMA3, ["resources.gpu_memory_gb=40", "finetune.num_workers=8",
                                         "resources.num_gpus_per_agent=1", "model.gpu_memory_utilization=0.85"]))


def test_vllm_engines_that_cannot_share_a_gpu_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"puts 2 vLLM engines on one GPU, each reserving "
                                          r"model\.gpu_memory_utilization=0\.85 of it; lower it to <= 0\.50"):
        check_resources(load_config(LLAMA3, ["model.gpu_memory_utilization=0.85"]))


def test_tests_configs_are_not_refused() -> None:
    # What the test suite runs: built-in models on fractional CPUs, and GPU inference for jobs that only debate.
    for overrides in ([], ["resources.num_cpus_per_agent=0.25", "finetune.cpus_per_worker=0.5"],
                      ["model.path=builtin:tiny-random", "resources.num_gpus_per_agent=1"]):
        finetunes = "resources.num_gpus_per_agent=1" not in overrides
        check_config(load_config(None, overrides), endpoint=False, finetunes=finetunes)


def test_cluster_too_small_for_the_society_or_a_finetune() -> None:
    plan = resource_plan(load_config(LLAMA3), ClusterSpec(nodes=1, gpus_per_node=2, cpus_per_node=96))
    assert not any(s.fits for s in plan.societies) and plan.finetune.at_once == 0
    assert any(p.startswith("the iteration 0 (base model) society needs 7 engine(s) of GPU 0.5") for p in plan.problems)
    assert any(p.startswith("a finetune needs 4 worker(s) of GPU 1, CPU 8") for p in plan.problems)
    two_nodes = resource_plan(load_config(LLAMA3, ["debate.agents=5"]), ClusterSpec(nodes=2, gpus_per_node=4))
    assert two_nodes.problems == [] and two_nodes.finetune.at_once == 2  # groups and societies span nodes


def test_mft_plan_prints_the_plan_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for path in LLAMA:
        assert cli.main(["plan", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "society, iteration 0 (base model):" in out and "memory per GPU, estimated:" in out, out
        assert "ZeRO-3, bf16, gradient checkpointing on" in out and out.rstrip().endswith("problems: none"), out
    assert cli.main(["plan", "--config", LLAMA3, "--json", "--nodes", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["nodes"] == 2 and data["finetune"]["workers"] == 4 and data["problems"] == []


def test_mft_plan_exits_2_with_the_problems(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--config", LLAMA3, "finetune.num_workers=1"]) == 2
    captured = capsys.readouterr()
    assert "PROBLEM: a finetune needs an estimated" in captured.out, captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the plan has 1 problem(s)" in errors[0], captured.err
    assert cli.main(["plan", "--config", LLAMA3, "--gpu-memory-gb", "40"]) == 2
    assert "more than the cluster's 40 GiB GPUs" in capsys.readouterr().out
    assert cli.main(["plan", "--config", LLAMA3, "--nodes", "0"]) == 2
    assert "error: --nodes must be >= 1, got 0" in capsys.readouterr().err
