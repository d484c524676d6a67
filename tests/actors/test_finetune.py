"""How many finetunes run at once (mft_ray.training.slots.concurrent_slots): as many as the cluster holds."""

from __future__ import annotations

import json

import pytest

from actors import finetune, placement
from actors.finetune import checkpointed_runs, plan_lanes
from mft_ray.config import load_config
from mft_ray.training.slots import concurrent_slots, lanes_at_once, lone_worker_cpus, memory_slots
from mft_ray.training.spec import FinetuneJob, training_spec
from tests.conftest import REPO
from tests.run.test_plan import SMOLLM2_135M


@pytest.mark.parametrize(("workers", "cpus", "gpus", "total", "slots"), [
    (1, 0.5, 0.0, {"CPU": 2.0}, 4),                    # half a core per worker: 4 lanes on 2 cores
    (1, 1.0, 0.0, {"CPU": 2.0}, 2),                    # the CPU configs: 2 lanes
    (4, 8.0, 1.0, {"CPU": 96.0, "GPU": 8.0}, 2),       # Llama-3-8B on 8 x H100: GPUs bound it
    (4, 8.0, 1.0, {"CPU": 40.0, "GPU": 16.0}, 1),      # CPUs bound it
    (1, 0.0, 0.0, {"CPU": 2.0}, 1),                    # asks for nothing: one at a time, not unbounded
    (2, 1.0, 0.0, {"CPU": 1.0}, 1),                    # never 0: Ray queues it, check_finetunes_fit refuses
    (1, 0.3, 0.0, {"CPU": 0.9}, 3),                    # float resources
])
def test_slots_are_what_the_cluster_holds_at_once(workers, cpus, gpus, total, slots) -> None:
    assert concurrent_slots(workers, cpus, gpus, total) == slots


@pytest.mark.parametrize(("per_worker", "slots", "node_free", "cpus"), [
    (1.0, 2, [2.0], 2.0),                # the CPU configs on 2 cores: the adapters' one worker gets both
    (0.5, 4, [2.0], 2.0),                # half a core per lane, 4 lanes: the same 2 cores, whole threads
    (1.0, 2, [1.75], 1.0),               # a quarter core held elsewhere: never wait for it, never below the setting
    (1.0, 1, [16.0], 1.0),               # finetune.max_concurrent=1: one lane's worth
    (4.0, 8, [16.0, 16.0, 12.0], 16.0),  # nodes of 16: one worker lives on one node
    (4.0, 8, [15.0, 15.0, 15.0], 15.0),  # a CPU held on every node: 45 free in all, but 15 on any one node
    (1.0, 2, [], 1.0),                   # no reading: the setting
])
def test_a_run_that_trains_alone_takes_the_cpus_its_lanes_would(per_worker, slots, node_free, cpus) -> None:
    asked = []
    assert lone_worker_cpus(1, per_worker, 0.0, slots, lambda want: asked.append(want) or node_free) == cpus
    assert asked == [per_worker * slots]


@pytest.mark.parametrize(("workers", "gpus"), [(2, 0.0), (1, 1.0), (1, 0.5)])
def test_only_a_lone_cpu_worker_widens(workers, gpus) -> None:
    def unread(want: float) -> list[float]:
        raise AssertionError("the free CPUs are read only for a lone CPU worker")
    assert lone_worker_cpus(workers, 1.0, gpus, 4, unread) == 1.0


def test_lanes_at_once_stop_at_max_concurrent() -> None:
    assert lanes_at_once(1, 1.0, 0.0, {"CPU": 8.0}) == 8
    assert lanes_at_once(1, 1.0, 0.0, {"CPU": 8.0}, max_concurrent=3) == 3
    assert lanes_at_once(1, 1.0, 0.0, {"CPU": 2.0}, max_concurrent=3) == 2


@pytest.mark.parametrize(("workers", "per_worker_gb", "nodes_gb", "slots"), [
    (1, 11.0, [16.2], 1),         # SmolLM2 critics in fp32 on a 24 GB machine (Ray's 16.2 GiB): one lane, not 2
    (1, 6.3, [16.2], 2),          # with gradient checkpointing: both lanes
    (1, 20.0, [16.2], 1),         # over a node: still one (an upper bound); actors.finetune warns
    (2, 5.0, [16.0, 16.0], 3),    # 3 + 3 workers on two nodes, 2 per finetune
    (1, 0.0, [16.0], 10**9),      # no estimate to go by: memory does not bound the lanes
])
def test_cpu_lanes_fit_the_nodes_memory(workers, per_worker_gb, nodes_gb, slots) -> None:
    assert memory_slots(workers, per_worker_gb, nodes_gb) == slots


# -- lanes: several finetunes per Ray Train run (actors.finetune.plan_lanes) -----------------------------------


def _job(name: str, cost: float = 1.0):
    job = FinetuneJob(name, "base", f"/data/{name}.jsonl", f"/out/{name}", spec=None)  # type: ignore[arg-type]
    object.__setattr__(job, "_cost", cost)  # read by _cost below instead of a data file's size
    return job


def _cost(job) -> float:
    return job._cost


def test_lanes_balance_the_work_longest_first():
    jobs = [_job("generator_0", 1), _job("generator_1", 4), _job("generator_2", 3), _job("critic_0", 9),
            _job("critic_1", 4), _job("critic_2", 2)]
    lanes = plan_lanes(jobs, 2, cost=_cost)
    assert [(name, [j.name for j in lane]) for name, lane in lanes] == [
        ("critic_0", ["critic_0", "critic_2", "generator_0"]),        # 9 + 2 + 1 = 12
        ("generator_1", ["generator_1", "critic_1", "generator_2"]),  # 4 + 4 + 3 = 11
    ]
    assert sorted(j.name for _, lane in lanes for j in lane) == sorted(j.name for j in jobs)  # each once
    # As many lanes as finetunes at most; one lane holds them all in order of their work.
    assert [len(lane) for _, lane in plan_lanes(jobs[:3], 8, cost=_cost)] == [1, 1, 1]
    assert [j.name for j in plan_lanes(jobs[:3], 1, cost=_cost)[0][1]] == ["generator_1", "generator_2", "generator_0"]


def test_a_finetune_with_a_checkpoint_leads_the_lane_that_holds_it():
    """A rerun resumes a killed finetune only in the Ray Train run (directory) that holds its checkpoint."""
    jobs = [_job("generator_0", 1), _job("generator_1", 4), _job("critic_0", 9), _job("critic_1", 2)]
    # generator_0 was the second finetune of the lane "critic_1"; critic_1 itself was exported before the kill.
    lanes = plan_lanes([j for j in jobs if j.name != "critic_1"], 2, {"generator_0": "critic_1"}, cost=_cost)
    assert [(name, [j.name for j in lane]) for name, lane in lanes] == [
        ("critic_1", ["generator_0", "generator_1"]), ("critic_0", ["critic_0"])]
    # More checkpoints than lanes: the extra one trains from the start in another lane, never in a run named
    # after a job whose directory holds someone else's state.
    lanes = plan_lanes(jobs, 1, {"generator_0": "critic_1", "critic_0": "generator_0"}, cost=_cost)
    assert [(name, [j.name for j in lane]) for name, lane in lanes] == [
        ("critic_1", ["generator_0", "critic_0", "generator_1", "critic_1"])]
    lanes = plan_lanes(jobs, 2, {"critic_0": "generator_1"}, cost=_cost)
    assert [name for name, _ in lanes] == ["generator_1", "generator_1_"]


def _ray_train_run(storage, run: str, job: str | None, registered: bool = True) -> None:
    """A Ray Train run directory as Ray Train 2.60 leaves it: a snapshot naming its latest checkpoint, which
    holds the training loop's state file."""
    ckpt = storage / run / "checkpoint_2026-12-04_10-00-00.000000"
    ckpt.mkdir(parents=True)
    state = {"fingerprint": "f", "next": 3, **({"job": job} if job else {})}
    (ckpt / "trainer_state_rank0.json").write_text(json.dumps(state))
    results = [{"checkpoint_dir_name": ckpt.name, "metrics": {}}] if registered else []
    (storage / run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))


def test_checkpointed_runs_names_the_finetune_each_checkpoint_belongs_to(tmp_path):
    _ray_train_run(tmp_path, "critic_1", "generator_0")   # a lane's second finetune
    _ray_train_run(tmp_path, "critic_2", None)            # written before lanes: the run's own finetune
    _ray_train_run(tmp_path, "generator_2", "generator_2", registered=False)  # reported, never registered
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint_manager_snapshot.json").write_text("{not json")
    assert checkpointed_runs(str(tmp_path)) == {"generator_0": "critic_1", "critic_2": "critic_2"}
    assert checkpointed_runs(str(tmp_path / "missing")) == {}


def test_cpu_lanes_are_capped_by_the_memory_of_nodes_that_can_host_a_worker(tmp_path, monkeypatch) -> None:
    """actors.finetune._memory_capped: the SmolLM2 critics that were killed in 2 fp32 lanes get one lane on a
    24 GB node (Ray's 16.2 GiB); a CPU-less head node's memory does not count; checkpointing allows both."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))

    def job(*overrides: str) -> FinetuneJob:
        config = load_config(REPO / "jobs/configs/smollm2_cpu.yaml", list(overrides))
        return FinetuneJob("critic_0", str(tmp_path), "data.jsonl", str(tmp_path / "out"),
                           training_spec(config, "critic", 1, 0))

    nodes = [{"CPU": 0.0, "memory": 100 * 2**30}, {"CPU": 2.0, "memory": 16.2 * 2**30}]
    monkeypatch.setattr(placement, "alive_node_resources", lambda: nodes)
    killed = job("finetune.gradient_checkpointing=false", "finetune.critic.max_length=1024")
    assert finetune._memory_capped(2, [killed], 1, 1.0) == 1
    assert finetune._memory_capped(2, [job()], 1, 1.0) == 2  # the shipped config: checkpointing, 640 tokens
    assert finetune._memory_capped(2, [killed], 1, 0.0) == 2  # a worker asking no CPU may land on the head
    monkeypatch.setattr(placement, "alive_node_resources", lambda: [{"CPU": 2.0}])  # no memory reading
    assert finetune._memory_capped(2, [killed], 1, 1.0) == 2
