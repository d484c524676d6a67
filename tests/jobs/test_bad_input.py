"""Bad input through the job entry points: each gets one clear line naming the problem, a non-zero exit,
and no output left behind.

The table runs each job's CLI in-process through ``run_cli`` with ``connect_ray`` replaced by a function
that fails the test, so every refusal is shown to happen before the cluster is touched (and the run
directory must not even exist). A few cases go through ``python -m jobs.X`` to check the real exit
status and that no traceback is printed. Resource and engine failures that need a cluster are
exercised through the pure checks and the error mapping, without starting Ray.

Covered elsewhere, not repeated here: config parsing errors in-process (tests/test_config.py), every
task's malformed-row messages (tests/tasks/test_tasks.py), split-size errors (tests/tasks/test_splits.py),
placement too big / blocked on a real cluster (tests/actors/test_debate_ray.py), an unreachable or silent
endpoint inside the OpenAI engine (tests/engines/test_engine_openai.py), truncated shards (tests/run/test_records.py).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import common
from jobs.common import run_cli
from mft_ray.errors import EXIT_INPUT, EXIT_MODEL, EXIT_RESOURCES, ConfigError, EngineError
from tests.conftest import REPO

TINY = str(REPO / "jobs" / "configs" / "tiny_cpu.yaml")
PLANTED = "sk-planted-URL-SECRET-4242"


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _gsm8k(n: int) -> list[dict]:
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad data files and bad model directories, written once."""
    d = tmp_path_factory.mktemp("bad-input")
    good = _gsm8k(3)
    (d / "bad_json.jsonl").write_text(json.dumps(good[0]) + "\n" + '{"question": "x", "answer": "#### 1"\n')
    _write_jsonl(d / "not_object.jsonl", [good[0], [1, 2]])
    _write_jsonl(d / "missing.jsonl", [good[0], {"question": "no answer here"}])
    _write_jsonl(d / "wrong_type.jsonl", [{"question": 5, "answer": "#### 5"}])
    _write_jsonl(d / "no_mark.jsonl", [{"question": "q", "answer": "no final answer"}])
    _write_jsonl(d / "math_bad.jsonl", [{"problem": "p", "level": "Level 1"}])
    _write_jsonl(d / "mmlu_bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "A"}])
    _write_jsonl(d / "small.jsonl", good)
    (d / "empty.jsonl").write_text("\n\n")
    (d / "data.csv").write_text("question,answer\n")
    rows = [good[0], {"question": "b", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), d / "missing.parquet")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    # A readable footer over a damaged page: the damage shows only when rows are read.
    pq.write_table(pa.Table.from_pylist(_gsm8k(50)), d / "bad_page.parquet", compression="snappy")
    column = pq.read_metadata(d / "bad_page.parquet").row_group(0).column(0)
    start = min(o for o in (column.dictionary_page_offset, column.data_page_offset) if o is not None)
    blob = bytearray((d / "bad_page.parquet").read_bytes())
    blob[start:start + 64] = b"\xff" * 64
    (d / "bad_page.parquet").write_bytes(bytes(blob))
    (d / "bad.yaml").write_text("debate: {agents: 3\n")
    (d / "a_file").write_text("x")
    (d / "no_config").mkdir()
    (d / "bad_config").mkdir()
    (d / "bad_config" / "config.json").write_text("{not json")
    (d / "no_type").mkdir()
    (d / "no_type" / "config.json").write_text("{}")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text('{"model_type": "llama"}')
    return d


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("the job reached connect_ray: bad input must be refused before the cluster is used")


def run_job(job: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``jobs.<job>``'s CLI in-process as ``python -m`` would; return (exit code, stderr)."""
    module = importlib.import_module(f"jobs.{job}")
    monkeypatch.setattr(module, "connect_ray", _no_ray)
    monkeypatch.setattr(common, "setup_logging", lambda: None)  # pytest owns the logging handlers
    try:
        code = run_cli(module.cli, ["--config", TINY, *args])
    except SystemExit as exc:  # argparse refuses bad flags itself, with exit status 2
        code = exc.code
    return code, capsys.readouterr().err


# (id, job, arguments, exit code, pattern the error line must match). {data} is the fixture directory,
# {port} a closed port. run_dir is added by the test.
CASES = [
    # -- malformed data: file and line (or row) named
    ("jsonl-invalid-json", "debate", ["task.name=gsm8k", "task.path={data}/bad_json.jsonl"], EXIT_INPUT,
     r"bad_json\.jsonl:2: invalid JSON"),
    ("jsonl-row-not-object", "debate", ["task.name=gsm8k", "task.path={data}/not_object.jsonl"], EXIT_INPUT,
     r"not_object\.jsonl:2: expected a JSON object, got list"),
    ("jsonl-missing-field", "debate", ["task.name=gsm8k", "task.path={data}/missing.jsonl"], EXIT_INPUT,
     r"missing\.jsonl:2: missing field 'answer'"),
    ("jsonl-wrong-type", "evaluate", ["task.name=gsm8k", "task.path={data}/wrong_type.jsonl"], EXIT_INPUT,
     r"wrong_type\.jsonl:1: field 'question' must be str, got int"),
    ("gsm8k-no-final-answer", "iterate", ["task.name=gsm8k", "task.path={data}/no_mark.jsonl"], EXIT_INPUT,
     r"no_mark\.jsonl:1: field 'answer' has no '####'"),
    ("math-missing-answer", "debate", ["task.name=math", "task.path={data}/math_bad.jsonl"], EXIT_INPUT,
     r"math_bad\.jsonl:1: missing field 'answer'"),
    ("mmlu-bad-choices", "debate", ["task.name=mmlu", "task.path={data}/mmlu_bad.jsonl"], EXIT_INPUT,
     r"mmlu_bad\.jsonl:1: field 'choices' must be a list of 4 strings"),
    ("parquet-missing-field", "debate", ["task.name=gsm8k", "task.path={data}/missing.parquet"], EXIT_INPUT,
     r"missing\.parquet:2: missing field 'answer'"),
    ("parquet-corrupt", "debate", ["task.name=gsm8k", "task.path={data}/corrupt.parquet"], EXIT_INPUT,
     r"corrupt\.parquet: cannot read Parquet file"),
    ("parquet-damaged-page", "debate", ["task.name=gsm8k", "task.path={data}/bad_page.parquet"], EXIT_INPUT,
     r"bad_page\.parquet:1: cannot read Parquet rows from here on"),
    ("unsupported-file-type", "debate", ["task.name=gsm8k", "task.path={data}/data.csv"], EXIT_INPUT,
     r"data\.csv: unsupported file type '\.csv'"),
    ("data-file-missing", "debate", ["task.name=gsm8k", "task.path={data}/nope.jsonl"], EXIT_INPUT,
     r"task\.path: no such file: .*nope\.jsonl"),
    # -- empty data and splits
    ("empty-file", "debate", ["task.name=gsm8k", "task.path={data}/empty.jsonl"], EXIT_INPUT,
     r"empty\.jsonl holds no problems"),
    ("both-splits-zero", "debate", ["task.finetune_size=0", "task.eval_size=0"], EXIT_INPUT,
     r"task: finetune_size \+ eval_size must be > 0"),
    ("debate-empty-split", "debate", ["--split", "eval", "task.eval_size=0"], EXIT_INPUT,
     r"task\.eval_size is 0: the eval split is empty"),
    ("evaluate-empty-split", "evaluate", ["task.eval_size=0"], EXIT_INPUT,
     r"task\.eval_size is 0: the eval split is empty, so there is nothing to evaluate"),
    ("iterate-empty-finetune-split", "iterate", ["task.finetune_size=0"], EXIT_INPUT,
     r"task\.finetune_size is 0: .*finetune\.iterations=0"),
    # -- split sizes larger than the data
    ("splits-larger-than-data", "debate",
     ["task.name=gsm8k", "task.path={data}/small.jsonl", "task.finetune_size=3", "task.eval_size=3"], EXIT_INPUT,
     r"task\.finetune_size \+ task\.eval_size = 3 \+ 3 = 6 but .*small\.jsonl has only 3 distinct problems"),
    ("eval-split-larger-than-eval-file", "evaluate",
     ["task.name=gsm8k", "task.path={data}/small.jsonl", "task.eval_path={data}/small.jsonl",
      "task.eval_size=4", "task.finetune_size=1"], EXIT_INPUT,
     r"task\.eval_size = 4 but task\.eval_path .*small\.jsonl has only 3"),
    ("arithmetic-larger-than-max-int-allows", "debate", ["task.max_int=1"], EXIT_INPUT,
     r"task\.max_int = 1 allows only 64 distinct arithmetic problems"),
    # -- unknown names
    ("unknown-task", "debate", ["task.name=chess"], EXIT_INPUT, r"task\.name must be one of .*got 'chess'"),
    ("unknown-engine", "debate", ["model.engine=tgi"], EXIT_INPUT, r"model\.engine must be one of .*got 'tgi'"),
    ("unknown-init-method", "iterate", ["finetune.init_from=scratch"], EXIT_INPUT,
     r"finetune\.init_from must be one of \['previous', 'base'\], got 'scratch'"),
    ("unknown-placement-strategy", "debate", ["resources.placement_strategy=RANDOM"], EXIT_INPUT,
     r"resources\.placement_strategy must be one of .*got 'RANDOM'"),
    ("unknown-setting", "debate", ["debate.agnets=3"], EXIT_INPUT, r"unknown setting 'debate\.agnets'"),
    ("unknown-split", "debate", ["--split", "test"], 2, r"argument --split: invalid choice: 'test'"),
    ("unknown-builtin-model", "debate", ["model.path=builtin:huge"], EXIT_INPUT,
     r"model\.path: unknown built-in model 'huge'"),
    # -- invalid numbers
    ("agents-zero", "debate", ["debate.agents=0"], EXIT_INPUT, r"debate\.agents must be >= 1, got 0"),
    ("agents-negative", "iterate", ["debate.agents=-2"], EXIT_INPUT, r"debate\.agents must be >= 1, got -2"),
    ("agents-not-integer", "debate", ["debate.agents=2.5"], EXIT_INPUT, r"debate\.agents must be an integer, got 2\.5"),
    ("rounds-zero", "debate", ["debate.rounds=0"], EXIT_INPUT, r"debate\.rounds must be >= 1, got 0"),
    ("w-above-one", "iterate", ["finetune.critic_mix_w=1.5"], EXIT_INPUT,
     r"finetune\.critic_mix_w must lie in \[0, 1\], got 1\.5"),
    ("w-below-zero", "iterate", ["finetune.critic_mix_w=-0.1"], EXIT_INPUT,
     r"finetune\.critic_mix_w must lie in \[0, 1\], got -0\.1"),
    ("w-nan", "iterate", ["finetune.critic_mix_w=.nan"], EXIT_INPUT,
     r"finetune\.critic_mix_w must be a finite number, got nan"),
    ("negative-generator-lr", "iterate", ["finetune.generator.learning_rate=-1e-5"], EXIT_INPUT,
     r"finetune\.generator\.learning_rate must be > 0, got -1e-05"),
    ("zero-critic-lr", "iterate", ["finetune.critic.learning_rate=0"], EXIT_INPUT,
     r"finetune\.critic\.learning_rate must be > 0, got 0\.0"),
    ("negative-later-lr", "iterate", ["finetune.later_learning_rate=-1e-6"], EXIT_INPUT,
     r"finetune\.later_learning_rate must be > 0"),
    ("infinite-temperature", "debate", ["sampling.temperature=.inf"], EXIT_INPUT,
     r"sampling\.temperature must be a finite number, got inf"),
    ("zero-top-p", "debate", ["sampling.top_p=0"], EXIT_INPUT, r"sampling\.top_p must lie in \(0, 1\], got 0"),
    ("zero-placement-timeout", "debate", ["resources.placement_timeout_s=0"], EXIT_INPUT,
     r"resources\.placement_timeout_s must be > 0, got 0"),
    # -- model paths
    ("model-path-missing", "debate", ["model.path={data}/nope"], EXIT_INPUT,
     r"model\.path: model directory does not exist: .*nope"),
    ("model-path-is-a-file", "debate", ["model.path={data}/a_file"], EXIT_INPUT,
     r"model\.path: .*a_file is a file, not a model directory"),
    ("model-dir-without-config", "debate", ["model.path={data}/no_config"], EXIT_INPUT,
     r"model\.path: .*no_config is not a Hugging Face model \(no config\.json\)"),
    ("model-config-not-json", "debate", ["model.path={data}/bad_config"], EXIT_INPUT,
     r"model\.path: .*bad_config is not a Hugging Face model \(config\.json unreadable"),
    ("model-config-without-type", "debate", ["model.path={data}/no_type"], EXIT_INPUT,
     r"model\.path: .*no_type is not a Hugging Face model \(config\.json has no model_type\)"),
    ("model-without-weights", "iterate", ["model.path={data}/no_weights"], EXIT_INPUT,
     r"model\.path: .*no_weights holds no model weights"),
    # -- the OpenAI-compatible endpoint
    ("endpoint-unreachable", "debate",
     ["model.engine=openai", "model.path=served", "model.base_url=http://127.0.0.1:{port}/v1"], EXIT_INPUT,
     r"model\.base_url: cannot connect to http://127\.0\.0\.1:\d+/v1 \(Connection refused\)"),
    ("endpoint-unreachable-evaluate", "evaluate",
     ["model.engine=openai", "model.path=served", "model.base_url=http://127.0.0.1:{port}/v1"], EXIT_INPUT,
     r"model\.base_url: cannot connect"),
    ("endpoint-missing", "debate", ["model.engine=openai", "model.path=served"], EXIT_INPUT,
     r"model\.base_url is required for engine 'openai'"),
    ("endpoint-not-http", "debate", ["model.engine=openai", "model.path=served", "model.base_url=ftp://h/v1"],
     EXIT_INPUT, r"model\.base_url must be an http\(s\) URL"),
    # -- config files and overrides
    ("config-file-missing", "debate", ["--config", "{data}/nope.yaml"], EXIT_INPUT, r"config file not found"),
    ("config-file-invalid-yaml", "debate", ["--config", "{data}/bad.yaml"], EXIT_INPUT, r"bad\.yaml: invalid YAML"),
    ("override-without-value", "debate", ["debate.agents"], EXIT_INPUT,
     r"override 'debate\.agents' must look like key\.sub=value"),
    # -- evaluating a society that does not exist
    ("evaluate-unbuilt-society", "evaluate", ["--iteration", "2"], EXIT_INPUT,
     r"--iteration 2: society 2 is not built yet"),
    ("evaluate-negative-iteration", "evaluate", ["--iteration", "-1"], EXIT_INPUT, r"--iteration must be >= 0"),
]


@pytest.mark.parametrize(("job", "args", "code", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_before_any_work(job: str, args: list[str], code: int, pattern: str,
                                                      data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import re

    run_dir = tmp_path / "run"
    port = free_port()
    argv = [a.format(data=data, port=port) for a in args] + [f"run_dir={run_dir}"]
    start = time.monotonic()
    got, err = run_job(job, argv, monkeypatch, capsys)
    assert got == code, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err  # one line, naming the problem
    assert re.search(pattern, error_lines[0]), error_lines[0]
    assert not run_dir.exists(), "refused input left a run directory behind"
    assert time.monotonic() - start < 30


def test_unwritable_run_dir_under_a_file(data: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A path below a regular file cannot be created even by root.
    code, err = run_job("debate", [f"run_dir={data}/a_file/run"], monkeypatch, capsys)
    assert code == EXIT_INPUT
    assert "run_dir" in err and "is not writable: Not a directory" in err
    assert (data / "a_file").read_text() == "x"


def test_unwritable_run_dir_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):  # root (CAP_DAC_OVERRIDE) writes through directory permissions
            pytest.skip("running as root: a read-only directory is still writable (the under-a-file case covers it)")
        code, err = run_job("debate", [f"run_dir={parent}/run"], monkeypatch, capsys)
        assert code == EXIT_INPUT
        assert "is not writable: Permission denied" in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def test_endpoint_credentials_are_not_echoed(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"http://user:{PLANTED}@127.0.0.1:{free_port()}/v1?api_key={PLANTED}#{PLANTED}"
    code, err = run_job("debate", ["model.engine=openai", "model.path=served", f"model.base_url={url}",
                                   f"run_dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == EXIT_INPUT and "cannot connect to http://127.0.0.1:" in err
    assert PLANTED not in err


def test_endpoint_check_can_be_turned_off(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # With the check off the job goes on to start Ray (here: the stand-in that fails the test's way).
    with pytest.raises(AssertionError, match="reached connect_ray"):
        run_job("debate", ["model.engine=openai", "model.path=served", "model.check_endpoint=false",
                           f"model.base_url=http://127.0.0.1:{free_port()}/v1", f"run_dir={tmp_path / 'run'}",
                           "task.finetune_size=1", "task.eval_size=1"], monkeypatch, capsys)


def test_endpoint_behind_a_proxy_is_left_to_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # The HTTP client goes through the proxy, so a direct connection proves nothing either way.
    from mft_ray.run.preflight import check_endpoint

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    check_endpoint(f"https://api.example.invalid:{free_port()}/v1", timeout_s=0.5)  # no error, no lookup
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(ConfigError, match=r"model\.base_url: cannot connect"):
        check_endpoint(f"https://127.0.0.1:{free_port()}/v1", timeout_s=0.5)


# -- the real command line ----------------------------------------------------------------------------


SUBPROCESS_CASES = [
    ("debate", ["debate.agents=0"], r"error: debate\.agents must be >= 1, got 0"),
    ("iterate", ["task.name=gsm8k", "task.path={data}/bad_json.jsonl"], r"error: .*bad_json\.jsonl:2: invalid JSON"),
    ("evaluate", ["model.engine=openai", "model.path=m", "model.base_url=http://127.0.0.1:{port}/v1"],
     r"error: model\.base_url: cannot connect"),
    ("debate", ["run_dir={data}/a_file/run"], r"error: run_dir .* is not writable"),
]


@pytest.mark.parametrize(("job", "args", "pattern"), SUBPROCESS_CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                                           enumerate(SUBPROCESS_CASES)])
def test_command_line_exit_status_and_one_line(job: str, args: list[str], pattern: str, data: Path,
                                               tmp_path: Path) -> None:
    import re

    argv = [a.format(data=data, port=free_port()) for a in args]
    if not any(a.startswith("run_dir=") for a in argv):
        argv.append(f"run_dir={tmp_path / 'run'}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--config", TINY, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_INPUT, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(pattern, last), done.stderr
    assert not (tmp_path / "run").exists()


# -- resources the cluster cannot provide (no cluster needed: the checks are pure) ------------------------


def test_unmet_names_what_is_short() -> None:
    from actors.placement import unmet

    assert unmet([{"CPU": 0.25}] * 7, {"CPU": 2.0}, [{"CPU": 2.0}]) is None
    why = unmet([{"CPU": 1.0, "GPU": 1.0}] * 3, {"CPU": 16.0, "GPU": 2.0}, [{"CPU": 16.0, "GPU": 2.0}])
    assert why is not None and "short of GPU=1" in why and "whole cluster has CPU=16, GPU=2" in why
    # Enough in total, but no single node can hold one bundle: it would never be placed.
    why = unmet([{"GPU": 2.0}], {"CPU": 8.0, "GPU": 2.0}, [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}])
    assert why is not None and "no node has that much" in why and "GPU=2" in why
    assert unmet([{"CPU": 0.0, "GPU": 0.0}], {"CPU": 1.0}, [{"CPU": 1.0}]) is None  # zero asks are dropped


def test_iterate_refuses_a_finetune_bigger_than_the_cluster_before_any_debate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Ray Train would queue such a worker group and retry its start-up forever; the job must fail at once.
    import ray

    import actors.placement
    from actors.runtime import RayRuntime
    from jobs import iterate
    from mft_ray import stages

    monkeypatch.setattr(iterate, "connect_ray", RayRuntime)  # no Ray started: the resources below are faked
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    monkeypatch.setattr(actors.placement, "alive_node_resources", lambda: [{"CPU": 2.0}])

    def no_debate(*args, **kwargs):
        raise AssertionError("debated before checking the finetunes fit")

    monkeypatch.setattr(stages, "evaluate_society", no_debate)
    monkeypatch.setattr(common, "setup_logging", lambda: None)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    code = run_cli(iterate.cli, ["--config", TINY, f"run_dir={run_dir}", "finetune.cpus_per_worker=64"])
    err = capsys.readouterr().err
    assert code == EXIT_RESOURCES, err
    assert "a finetune needs CPU=64" in err and "finetune.cpus_per_worker" in err and "Traceback" not in err
    assert time.monotonic() - start < 30
    # Only the launch's config and base model are written; nothing that looks like a result.
    assert sorted(p.name for p in run_dir.rglob("*")) == ["base_model.txt", "config.yaml"]


# -- errors raised on the cluster reach the command line as one line ------------------------------------


def _ray_wrapped(exc: BaseException, hops: int) -> BaseException:
    """``exc`` as the driver sees it after ``hops`` remote calls (agent -> coordinator -> driver)."""
    from ray.exceptions import RayTaskError

    for hop in range(hops):
        wrapped = RayTaskError(f"remote_{hop}", f"Traceback (most recent call last):\n  File 'x{hop}.py'\n{exc}",
                               exc)
        # Ray subclasses the cause's type where it can; a cause that is itself a wrapper stays plain.
        exc = wrapped if isinstance(exc, RayTaskError) else wrapped.as_instanceof_cause()
    return exc


@pytest.mark.parametrize("hops", [0, 1, 2])
def test_engine_errors_from_the_cluster_are_one_line(hops: int, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "setup_logging", lambda: None)
    error = _ray_wrapped(EngineError("POST http://127.0.0.1:9/v1/chat/completions failed after 6 attempt(s);\n"
                                     "last error: ConnectionRefusedError"), hops)

    def main(argv):
        raise error

    assert run_cli(main, []) == EXIT_MODEL
    err = capsys.readouterr().err
    assert err == ("error: POST http://127.0.0.1:9/v1/chat/completions failed after 6 attempt(s); "
                   "last error: ConnectionRefusedError\n")


def test_placement_errors_exit_3_and_unexpected_errors_keep_their_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mft_ray.errors import PlacementError

    monkeypatch.setattr(common, "setup_logging", lambda: None)

    def placement(argv):
        raise _ray_wrapped(PlacementError("society needs GPU=1"), 1)

    assert run_cli(placement, []) == EXIT_RESOURCES
    assert capsys.readouterr().err == "error: society needs GPU=1\n"

    def bug(argv):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_cli(bug, [])


def test_agent_actor_reports_a_model_it_cannot_load_as_an_engine_error() -> None:
    # A failed actor __init__ reaches the driver only as ActorDiedError text (a remote traceback); the
    # actor keeps the EngineError and raises it from its first call, so the driver gets the error itself.
    from actors.agent import AgentActor
    from mft_ray.config import ModelConfig

    model = ModelConfig(engine="openai", path="m", base_url="ftp://nowhere/v1").__dict__
    actor = AgentActor.__ray_actor_class__(model, "m", ["generator_0"], "Answer in \\boxed{}.")
    with pytest.raises(EngineError, match=r"base_url must be an http\(s\) URL"):
        actor.info()
    with pytest.raises(EngineError, match=r"base_url must be an http\(s\) URL"):
        actor.generate([[{"role": "user", "content": "hi"}]], None)
