"""Iteration-0 debates shared between a study's runs (mft_ray.run.reuse): which runs share a debate, and the
copy that a resumed run then reads as its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_ray.config import Config, load_config
from mft_ray.errors import RecordsError
from mft_ray.models.adapters import split_weights
from mft_ray.run.records import debate_settings, read_records, split_shards, write_shard
from mft_ray.run.reuse import debate_identity, reuse_iteration0
from mft_ray.run.rundir import RunDir
from tests.conftest import REPO
from tests.run.test_records import make_rows

SMOLLM2 = REPO / "jobs/configs/smollm2_cpu.yaml"


def _config(method: str, root: Path, *overrides: str) -> Config:
    return load_config(SMOLLM2, [f"method={method}", f"run_dir={root / method}", "task.finetune_size=6",
                                 "task.eval_size=6", "debate.shard_size=4", *overrides])


@pytest.mark.parametrize(("a", "b", "shared"), [
    # Single-agent FT debates the same N x M society of the base model on both splits before it finetunes.
    ("multiagent_ft", "single_agent_ft", {"eval", "finetune"}),
    ("multiagent_ft", "multiagent_ft_no_critic", {"eval", "finetune"}),
    # STaR and Majority FT both take N one-round samples and score N one-round samples.
    ("majority_ft", "star", {"eval", "finetune"}),
    ("multiagent_ft", "majority_ft", set()),             # 1 round, not a debate
    ("multiagent_ft", "unique_id_ft", set()),            # other prompts
    ("multiagent_ft", "single_agent_ft_high_temp", set()),  # temperature 2
    ("multiagent_ft", "multiagent_ft_no_summary", set()),   # other answers concatenated
    ("single_agent_ft", "single_agent_ft_no_debate", {"finetune"}),  # the same data debate; scored alone
])
def test_runs_share_a_debate_exactly_when_it_would_be_the_same(tmp_path, a, b, shared) -> None:
    ca, cb = _config(a, tmp_path), _config(b, tmp_path)
    assert {s for s in ("eval", "finetune") if debate_identity(ca, s) == debate_identity(cb, s)} == shared


def test_what_decides_the_records_is_in_the_identity_and_what_does_not_is_not(tmp_path) -> None:
    full = _config("multiagent_ft", tmp_path)
    for same in ("finetune.adapter=lora", "finetune.iterations=1", "debate.shards_in_flight=1",
                 "resources.num_cpus_per_agent=0.5", "finetune.generator.learning_rate=1e-4"):
        assert debate_identity(_config("multiagent_ft", tmp_path, same), "eval") == debate_identity(full, "eval"), same
    for other in ("sampling.temperature=0.7", "seed=1", "task.max_int=20", "model.engine=hf", "debate.rounds=3",
                  "debate.shuffle_others=false", "debate.shard_size=3", "sampling.max_new_tokens=64",
                  "resources.share_engine=false", "model.path=/elsewhere/model"):
        assert debate_identity(_config("multiagent_ft", tmp_path, other), "eval") != debate_identity(full, "eval"), other
    assert debate_identity(_config("majority_matched", tmp_path), "finetune") is None  # evaluation only
    assert debate_identity(_config("multiagent_ft", tmp_path, "finetune.iterations=0"), "finetune") is None


def _debate(config: Config, split: str, ids: list[str]) -> Path:
    """Start ``config``'s run as run_algorithm does and write the shards of a whole debate of ``ids`` into it,
    as the coordinator does."""
    run = RunDir(config.run_dir)
    run.prepare(config)
    run.record_base_model(split_weights(config.model.path)[0])
    d = config.debate
    out = run.debate_dir(0, split)
    for k, shard in enumerate(split_shards(ids, d.shard_size)):
        write_shard(out, k, make_rows(list(shard)), list(shard),
                    debate_settings(d.agents, d.rounds, d.summarize, d.shuffle_others))
    return out


def test_a_shared_debate_is_copied_once_and_read_back_as_the_runs_own(tmp_path) -> None:
    src, dst = _config("multiagent_ft", tmp_path), _config("single_agent_ft", tmp_path)
    ids = [f"p{i}" for i in range(6)]
    source = _debate(src, "eval", ids)
    assert reuse_iteration0(dst, src.run_dir) == ["eval"]  # no finetune-split shards in the source yet
    run = RunDir(dst.run_dir)
    d = dst.debate
    settings = debate_settings(d.agents, d.rounds, d.summarize, d.shuffle_others)
    assert run.debate_complete(0, "eval", ids, d.shard_size, settings)  # a resumed run skips this debate
    assert read_records(run.debate_dir(0, "eval")).equals(read_records(source))
    assert json.loads(run.reused_path(0).read_text()) == {"eval": str(source)}
    # Later, the source's finetune-split debate: copied on the next start, the record says both.
    finetune = _debate(src, "finetune", ids)
    assert reuse_iteration0(dst, src.run_dir) == ["finetune"]
    assert json.loads(run.reused_path(0).read_text()) == {"eval": str(source), "finetune": str(finetune)}
    assert reuse_iteration0(dst, src.run_dir) == []  # never twice, never over the run's own
    assert not list(run.iteration_dir(0).glob(".*partial"))


def test_a_run_that_began_its_debate_keeps_its_own(tmp_path) -> None:
    src, dst = _config("multiagent_ft", tmp_path), _config("single_agent_ft", tmp_path)
    _debate(src, "eval", [f"p{i}" for i in range(6)])
    own = _debate(dst, "eval", ["p0", "p1", "p2", "p3"])  # its first shard only
    assert reuse_iteration0(dst, src.run_dir) == []
    assert [p.name for p in sorted(own.iterdir())] == ["shard_00000.parquet"]
    assert reuse_iteration0(_config("majority_ft", tmp_path), src.run_dir) == []  # another debate: nothing copied
    assert not RunDir(_config("majority_ft", tmp_path).run_dir).iteration_dir(0).exists()


def test_a_copied_shard_of_other_problems_is_refused_when_read(tmp_path) -> None:
    """The copy is checked as any resumed shard is: a source made for other problems cannot slip in."""
    src, dst = _config("multiagent_ft", tmp_path), _config("single_agent_ft", tmp_path)
    _debate(src, "eval", [f"q{i}" for i in range(6)])
    assert reuse_iteration0(dst, src.run_dir) == ["eval"]
    d = dst.debate
    with pytest.raises(RecordsError, match="other problems"):
        RunDir(dst.run_dir).debate_complete(0, "eval", [f"p{i}" for i in range(6)], d.shard_size,
                                            debate_settings(d.agents, d.rounds, d.summarize, d.shuffle_others))


def test_a_source_is_judged_by_what_it_ran(tmp_path, caplog) -> None:
    """Not by the study's config today: a source debated at another temperature, from a built-in model since
    rebuilt, or whose saved config no longer loads, lends nothing; nor is a run of another method filled."""
    ids = [f"p{i}" for i in range(6)]
    dst = _config("single_agent_ft", tmp_path)
    hot = _config("multiagent_ft", tmp_path / "hot", "sampling.temperature=0.9")
    _debate(hot, "eval", ids)
    assert reuse_iteration0(dst, hot.run_dir) == []
    old = _config("multiagent_ft", tmp_path / "old")
    _debate(old, "eval", ids)
    RunDir(old.run_dir).base_model_path.write_text("/cache/models/smollm2-135m-instruct-OLD\n")
    assert reuse_iteration0(dst, old.run_dir) == []
    broken = _config("multiagent_ft", tmp_path / "broken")
    _debate(broken, "eval", ids)
    RunDir(broken.run_dir).config_path.write_text("task: [not, a, mapping]\n")
    assert reuse_iteration0(dst, broken.run_dir) == [] and "not offered for reuse" in caplog.text
    good = _config("multiagent_ft", tmp_path / "good")
    _debate(good, "eval", ids)
    other_method = _config("single_agent_ft", tmp_path / "taken")
    RunDir(other_method.run_dir).prepare(_config("majority_ft", tmp_path / "taken"))
    assert reuse_iteration0(other_method, good.run_dir) == []
    assert reuse_iteration0(dst, good.run_dir) == ["eval"]  # the same source, as it ran
