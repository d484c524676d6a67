"""Config loading: the shipped configs, dotted YAML-typed overrides, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mft_ray.config import (
    Config,
    DebateConfig,
    ModelConfig,
    TaskConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from mft_ray.errors import ConfigError
from mft_ray.run.preflight import check_config
from mft_ray.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Paths inside the shipped configs (../shared/data/...) are relative to the repository root.
    monkeypatch.chdir(REPO)


# ---------------------------------------------------------------------------------------------
# The shipped configs


def test_there_are_shipped_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "llama3_8b_3agents.yaml", "llama3_8b_5agents.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_matches_its_yaml(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    # Every value written in the file ends up in the config (nothing silently dropped or defaulted).
    def check(node: object, values: dict, where: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                check(getattr(node, key), value, f"{where}{key}.")
            else:
                assert getattr(node, key) == value, f"{path.name}: {where}{key}"

    check(cfg, raw, "")
    cfg.validate()


def test_tiny_cpu_config_values() -> None:
    cfg = load_config(REPO / "jobs" / "configs" / "tiny_cpu.yaml")
    assert cfg.task.name == "arithmetic"
    assert cfg.model.path == "builtin:tiny-random"
    assert cfg.model.engine == "hf"
    assert (cfg.debate.agents, cfg.debate.rounds, cfg.debate.shard_size) == (3, 2, 16)
    assert cfg.resources.num_gpus_per_agent == 0.0
    assert isinstance(cfg.resources.num_gpus_per_agent, float)  # int in YAML, coerced to float


def test_llama_configs_differ_only_in_agents_and_run_dir() -> None:
    three = load_config(REPO / "jobs" / "configs" / "llama3_8b_3agents.yaml").to_dict()
    five = load_config(REPO / "jobs" / "configs" / "llama3_8b_5agents.yaml").to_dict()
    assert three["debate"]["agents"] == 3 and five["debate"]["agents"] == 5
    assert three["model"]["engine"] == "vllm"
    for d in (three, five):
        d["debate"].pop("agents")
        d.pop("run_dir")
    assert three == five


# ---------------------------------------------------------------------------------------------
# Overrides


def test_defaults_without_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.debate.agents == 3 and cfg.debate.rounds == 2


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(None, [
        "debate.agents=5",
        "debate.summarize=false",
        "task.levels=[1,2]",
        "task.path=null",
        "sampling.temperature=0.7",
        "run_dir=runs/x",
    ])
    assert cfg.debate.agents == 5 and isinstance(cfg.debate.agents, int)
    assert cfg.debate.summarize is False
    assert cfg.task.levels == [1, 2]
    assert cfg.task.path is None
    assert cfg.sampling.temperature == pytest.approx(0.7)
    assert cfg.run_dir == "runs/x"


def test_override_on_top_of_file_keeps_other_values() -> None:
    cfg = load_config(REPO / "jobs" / "configs" / "tiny_cpu.yaml", ["debate.agents=5", "task.levels=null"])
    assert cfg.debate.agents == 5
    assert cfg.debate.shard_size == 16  # from the file, not the default 64
    assert cfg.task.finetune_size == 48
    assert cfg.task.levels is None


def test_later_override_wins() -> None:
    cfg = load_config(None, ["debate.rounds=2", "debate.rounds=4"])
    assert cfg.debate.rounds == 4


def test_parse_overrides_values() -> None:
    assert parse_overrides(["a.b=5", "c=true", "d=null", "e=[1, 2]", "f=x=y", "g="]) == [
        ("a.b", 5), ("c", True), ("d", None), ("e", [1, 2]), ("f", "x=y"), ("g", ""),
    ]


def test_float_setting_accepts_int_but_int_setting_refuses_float() -> None:
    assert load_config(None, ["sampling.top_p=1"]).sampling.top_p == 1.0
    with pytest.raises(ConfigError, match=r"debate\.agents must be an integer"):
        load_config(None, ["debate.agents=2.5"])
    with pytest.raises(ConfigError, match=r"debate\.agents must be an integer"):
        load_config(None, ["debate.agents=true"])  # a bool is not an int here


# ---------------------------------------------------------------------------------------------
# Bad values: a ConfigError whose message names the setting


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("debate.agents=0", r"debate\.agents must be >= 1, got 0"),
        ("debate.rounds=0", r"debate\.rounds must be >= 1, got 0"),
        ("debate.shard_size=0", r"debate\.shard_size"),
        ("task.name=chess", r"task\.name must be one of .*'chess'"),
        ("model.engine=tgi", r"model\.engine must be one of .*'tgi'"),
        ("debate.agnets=3", r"unknown setting 'debate\.agnets'"),
        ("colour=red", r"unknown setting 'colour'"),
        ("debate.agents=abc", r"debate\.agents must be an integer, got 'abc'"),
        ("debate.summarize=maybe", r"debate\.summarize must be true or false"),
        ("task.levels=[1,x]", r"task\.levels\[1\] must be an integer"),
        ("task.levels=[0,2]", r"task\.levels must lie in 1\.\.5"),
        ("sampling.top_p=0", r"sampling\.top_p must lie in \(0, 1\], got 0"),
        ("sampling.top_p=1.5", r"sampling\.top_p"),
        ("sampling.temperature=-1", r"sampling\.temperature must be >= 0"),
        ("task.path=/definitely/not/here.jsonl", r"task\.path: no such file: /definitely/not/here\.jsonl"),
        ("task.eval_path=/definitely/not/here.jsonl", r"task\.eval_path: no such file"),
        ("model.path=./nope/model", r"model\.path: model directory does not exist: \./nope/model"),
        ("model.path=builtin:nope", r"model\.path: unknown built-in model 'nope'"),
        ("model.dtype=int3", r"model\.dtype"),
        ("resources.placement_strategy=RANDOM", r"resources\.placement_strategy"),
        ("debate=5", r"debate must be a mapping"),
    ],
)
def test_bad_override_names_the_setting(override: str, pattern: str) -> None:
    # Field checks run when the config is built; names and paths outside it in the driver's preflight.
    with pytest.raises(ConfigError, match=pattern):
        check_config(load_config(None, [override]))


def test_override_below_a_scalar_setting() -> None:
    with pytest.raises(ConfigError, match=r"override 'debate\.agents\.x': 'agents' is not a section"):
        load_config(REPO / "jobs" / "configs" / "tiny_cpu.yaml", ["debate.agents.x=1"])
    with pytest.raises(ConfigError, match=r"debate\.agents must be an integer"):
        load_config(None, ["debate.agents.x=1"])


def test_non_arithmetic_task_requires_path() -> None:
    with pytest.raises(ConfigError, match=r"task\.path is required for task 'gsm8k'"):
        load_config(None, ["task.name=gsm8k"])
    cfg = load_config(None, ["task.name=gsm8k", "task.path=../shared/data/gsm8k/test.jsonl"])
    assert cfg.task.path == "../shared/data/gsm8k/test.jsonl"


def test_model_dir_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path: .* is not a Hugging Face model \(no config\.json\)"):
        check_config(load_config(None, [f"model.path={tmp_path}"]))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"")  # only its presence is checked here
    assert load_config(None, [f"model.path={tmp_path}"]).model.path == str(tmp_path)
    check_config(load_config(None, [f"model.path={tmp_path}"]))


def test_hub_id_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that no local org/name directory can exist
    assert load_config(None, ["model.path=org/name"]).model.path == "org/name"
    check_config(load_config(None, ["model.path=org/name"]))
    # ...but a three-part relative path is a local path, and it does not exist.
    with pytest.raises(ConfigError, match=r"model\.path: model directory does not exist"):
        check_config(load_config(None, ["model.path=a/b/c"]))


def test_builtin_model_is_accepted() -> None:
    assert load_config(None, ["model.path=builtin:tiny-random"]).model.path == "builtin:tiny-random"
    check_config(load_config(None, ["model.path=builtin:tiny-random"]))


def test_dataclasses_validate_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"debate\.agents"):
        Config(debate=DebateConfig(agents=0))
    with pytest.raises(ConfigError, match=r"model\.engine"):
        Config(model=ModelConfig(engine="nope"))
    with pytest.raises(ConfigError, match=r"task\.name"):
        Config(task=TaskConfig(name="nope"))


@pytest.mark.parametrize("item", ["debate.agents", "=5", "  =5"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, [item])


def test_unparseable_override_value() -> None:
    with pytest.raises(ConfigError, match=r"override 'task\.levels=\[1,2': cannot parse value"):
        load_config(None, ["task.levels=[1,2"])


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_invalid_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("debate: [1, 2\n  agents: 3\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_yaml_file_whose_top_level_is_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'sampling\.temprature'"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_round_trip_through_dict_and_yaml(path: Path) -> None:
    cfg = load_config(path, ["debate.summarize=false", "task.levels=[2]"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    # The round trip is not vacuous: a changed value is seen.
    changed = cfg.to_dict()
    changed["debate"]["agents"] += 1
    assert config_from_dict(changed) != cfg


# ---------------------------------------------------------------------------------------------
# Run directory


def test_rundir_prepare_writes_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["debate.agents=4"])
    run = RunDir(tmp_path / "a" / "b")
    run.prepare(cfg)
    saved = run.root / "config.yaml"
    assert saved.is_file()
    assert config_from_dict(yaml.safe_load(saved.read_text())) == cfg
    assert [p.name for p in run.root.iterdir()] == ["config.yaml"]  # no probe or temp files left
    assert run.debate_dir(1, "eval") == run.root / "iter_1" / "debate_eval"
    assert run.metrics_path(0) == run.root / "iter_0" / "metrics.json"


def test_rundir_prepare_refuses_path_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = RunDir(blocker / "run")
    with pytest.raises(ConfigError, match=r"run_dir .*is not writable"):
        run.prepare(Config())
    assert blocker.read_text() == "x"


def test_rundir_refuses_a_run_started_from_another_base_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.check_base_model("/cache/models/testbed-aaaa")  # a new run directory: nothing to compare
    run.prepare(Config())
    run.record_base_model("/cache/models/testbed-aaaa")
    stamp = (run.root / "base_model.txt").stat().st_mtime_ns
    run.check_base_model("/cache/models/testbed-aaaa")  # a resume from the same model
    run.record_base_model("/cache/models/testbed-aaaa")
    assert (run.root / "base_model.txt").stat().st_mtime_ns == stamp  # a resume rewrites nothing
    saved = (run.root / "config.yaml").read_text()
    # A rebuilt testbed (another recipe) would otherwise have the old run's finished stages reprinted.
    with pytest.raises(ConfigError, match=r"started from base model '/cache/models/testbed-aaaa', not "
                                          r"'/cache/models/testbed-bbbb'.*use another run_dir"):
        run.check_base_model("/cache/models/testbed-bbbb")
    assert (run.root / "config.yaml").read_text() == saved
    assert (run.root / "base_model.txt").read_text() == "/cache/models/testbed-aaaa\n"
