"""The `mft` command: help for every subcommand, bad arguments refused clearly, `mft status` of a run
directory built by hand from its markers (no cluster needed here; the service is in test_service.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import cli
from tests.conftest import REPO

TINY = str(REPO / "jobs/configs/tiny_cpu.yaml")


@pytest.fixture(autouse=True)
def _quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import common

    monkeypatch.setattr(common, "setup_logging", lambda: None)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mft {command} "), out[:200]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in cli.COMMANDS), out


def test_console_script_is_installed() -> None:
    mft = Path(sys.executable).parent / "mft"
    done = subprocess.run([str(mft), "status", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: mft status"), done.stderr


def _run_dir(root: Path, iterations: int = 1) -> Path:
    """A run directory as the jobs write it, without any stage done: config.yaml only."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "run_dir": str(root), "model": {"path": "builtin:tiny-random"},
        "task": {"name": "arithmetic", "finetune_size": 6, "eval_size": 4},
        "debate": {"agents": 3, "rounds": 2, "shard_size": 4}, "finetune": {"iterations": iterations}}))
    return root


BAD = [
    ([], "usage: mft <command>"),
    (["bogus"], "error: unknown command 'bogus'; choose one of debate, evaluate"),
    (["ask"], "error: the following arguments are required: question"),
    (["ask", "--timeout", "0", "q"], "error: --timeout must be > 0, got 0"),
    (["ask", "--address", "127.0.0.1:1", "q"], "error: --address 127.0.0.1:1: nothing accepts connections there"),
    (["stop", "--address", "ray://127.0.0.1:1"], "is that its client server port (ray start --ray-client-server-port"),
    (["stop", "--address", "ray://no-port"], "error: --address 'ray://no-port': expected host:port or ray://host:port"),
    (["serve", "--iteration", "1"], "error: --iteration needs --run-dir"),
    (["serve", "--config", TINY, "debate.agents=0"], "error: debate.agents must be >= 1, got 0"),
    (["serve", "--run-dir", "{empty}"], "has no config.yaml; pass --config"),
    (["serve", "--run-dir", "{run}", "--iteration", "2"], "error: --iteration 2: society 2 is not built in"),
    (["status", "{missing}"], "error: run directory does not exist"),
    (["status", "{empty}"], "is not a run directory (no config.yaml and no iter_<l>/)"),
    (["debate", "--config", TINY, "debate.agents=0"], "error: debate.agents must be >= 1, got 0"),
    (["evaluate", "--config", TINY, "--iteration", "-1"], "error: --iteration must be >= 0, got -1"),
    (["iterate", "--config", "nope.yaml"], "error: config file not found: nope.yaml"),
    (["report", "--run-dir", "{missing}"], "error: "),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_arguments_exit_2_with_a_clear_message(argv: list[str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    _run_dir(tmp_path / "run")
    places = {"{empty}": str(tmp_path / "empty"), "{run}": str(tmp_path / "run"),
              "{missing}": str(tmp_path / "missing")}
    argv = [places.get(a, a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "missing").exists()


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _status(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict]:
    assert cli.main(["status", str(run)]) == 0
    text = capsys.readouterr().out
    assert cli.main(["status", str(run), "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_status_follows_the_markers_of_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run")
    text, status = _status(run, capsys)
    assert "arithmetic, 3 agents, 2 rounds, 1 finetuning iteration(s)" in text
    assert [e["iteration"] for e in status["iterations"]] == [0, 1]
    assert status["next"] == "iteration 0: eval debate" and not status["complete"]
    assert "eval debate TODO (0/1 shards)" in text

    # Iteration 0 evaluated; its finetune debate (6 problems, shards of 4) half written.
    _touch(run / "iter_0/debate_eval/shard_00000.parquet")
    _touch(run / "iter_0/metrics.json", json.dumps({"accuracy": 0.5, "stderr": 0.25, "consensus": 0.75}))
    _touch(run / "iter_0/debate_finetune/shard_00000.parquet")
    _touch(run / "iter_0/debate_finetune/.shard_00001.parquet.abc.tmp")  # a write in progress is not a shard
    text, status = _status(run, capsys)
    assert status["next"] == "iteration 0: finetune debate"
    assert "metrics done (accuracy 0.500 ± 0.250, consensus 0.750)" in text
    assert "finetune debate TODO (1/2 shards)" in text

    # Finetune debate done, datasets built, finetunes done (one agent had no examples: 5 checkpoints).
    _touch(run / "iter_0/debate_finetune/shard_00001.parquet")
    _touch(run / "iter_1/datasets/counts.json", "{}")
    for member in ["generator_0", "generator_1", "generator_2", "critic_0", "critic_1"]:
        _touch(run / "iter_1" / member / "config.json", "{}")
    text, status = _status(run, capsys)
    assert status["iterations"][0]["done"] and status["next"] == "iteration 1: finetunes"
    assert "finetunes TODO (5/6 checkpoints, no society.json)" in text
    _touch(run / "iter_1/society.json", "{}")
    text, status = _status(run, capsys)
    assert status["next"] == "iteration 1: eval debate"
    assert "iteration 1: incomplete | datasets done (counts.json) | finetunes done (5/6 checkpoints, society.json)" in text

    # Everything but the report, then the report.
    _touch(run / "iter_1/debate_eval/shard_00000.parquet")
    _touch(run / "iter_1/metrics.json", json.dumps({"accuracy": 0.75, "stderr": 0.2, "consensus": 1.0}))
    text, status = _status(run, capsys)
    assert all(e["done"] for e in status["iterations"]) and status["next"] == "report" and not status["complete"]
    _touch(run / "results.md", "# Results\n")
    before = _snapshot(run)
    text, status = _status(run, capsys)
    assert status["complete"] and text.endswith("run complete\n")
    assert _snapshot(run) == before  # read-only


def test_status_shows_iterations_beyond_the_config_and_survives_a_bad_marker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run", iterations=0)
    _touch(run / "iter_0/metrics.json", "{not json")
    _touch(run / "iter_2/society.json", "{}")
    text, status = _status(run, capsys)
    assert [e["iteration"] for e in status["iterations"]] == [0, 1, 2]
    assert "metrics TODO (present but unreadable: the job redoes it)" in text
    assert (run / "iter_0/metrics.json").read_text() == "{not json"  # left as it is
