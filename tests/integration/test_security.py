"""Security defaults: nothing exposed beyond 127.0.0.1 and SSH, no remote code, model output parsed and
never evaluated, nothing unpickled, and secrets that stay in the environment.

Static checks read ``cluster.yaml`` and the source of ``mft_ray/``, ``actors/`` and ``jobs/`` (with the
AST, so comments and strings do not count); behavioural checks feed hostile model output to every
grader, and one short real run (``jobs.evaluate`` on Ray against a local OpenAI-compatible server that
requires the planted key) greps the run directory, the job's output and Ray's own logs for planted
secrets. That run is the only place this module starts Ray (2 CPUs, 0.25 CPU per agent).

Related tests elsewhere: the OpenAI engine never puts its key in errors or logs
(tests/engines/test_engine_openai.py::test_key_is_read_from_env_sent_as_bearer_and_never_leaked), and an
``api_key_env`` holding a key is refused without echoing it (test_engine_openai.py).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("mft_ray", "actors", "jobs")
TINY = str(REPO / "jobs" / "configs" / "tiny_cpu.yaml")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    return files


# -- cluster.yaml -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def test_cluster_yaml_binds_the_dashboard_to_localhost_and_exposes_nothing_on_all_interfaces(cluster) -> None:
    head = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head
    values = _strings(cluster)  # every value and key, comments excluded
    for s in values:
        assert "0.0.0.0" not in s and "::/0" not in s, s
    # No port forwarding or published container ports.
    assert "docker" not in cluster
    assert not any(re.search(r"(^|\s)(-p|--publish)\s", s) for s in values)


def test_cluster_yaml_security_group_opens_no_public_port(cluster) -> None:
    # Ray's AWS provider adds "SSH from 0.0.0.0/0" to any security group it creates; giving every node
    # type a security group of our own keeps Ray from creating (and opening) one.
    for name, node_type in cluster["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(isinstance(g, str) and g.startswith("sg-") for g in groups), name
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule  # SSH at most
        for ip_range in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", []):
            cidr = ip_range.get("CidrIp") or ip_range.get("CidrIpv6")
            assert cidr not in ("0.0.0.0/0", "::/0"), rule


def test_jobs_start_local_ray_without_a_dashboard() -> None:
    tree = ast.parse((REPO / "actors" / "runtime.py").read_text())  # init_ray, what the jobs call
    local = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "start_local_ray"]
    assert local
    for call in local:
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kwargs.get("include_dashboard") == "False", kwargs  # local instance: no dashboard
        assert "dashboard_host" not in kwargs
    joins = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "ray.init"]
    for call in joins:  # joining a cluster (its own dashboard settings), or start_local_ray's own call
        assert {k.arg for k in call.keywords} & {"address", None}, ast.unparse(call)
        assert "dashboard_host" not in {k.arg for k in call.keywords}


def test_no_service_binds_all_interfaces() -> None:
    # No code of ours listens on every interface (the wildcard addresses never appear as values).
    wildcard = [f"{path.relative_to(REPO)}:{node.lineno}" for path in _sources()
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant) and node.value in ("0.0.0.0", "::", "[::]")]
    assert wildcard == []


# -- nothing evaluated, nothing unpickled --------------------------------------------------------------

_BANNED_CALLS = {
    "eval": "eval() runs text as code",
    "exec": "exec() runs text as code",
    "compile": "compile() builds code from text",
    "__import__": "__import__ from data",
    "pickle.load": "pickle", "pickle.loads": "pickle", "cloudpickle.load": "pickle", "cloudpickle.loads": "pickle",
    "dill.load": "pickle", "dill.loads": "pickle", "joblib.load": "pickle", "marshal.load": "marshal",
    "marshal.loads": "marshal", "shelve.open": "pickle", "pd.read_pickle": "pickle", "pandas.read_pickle": "pickle",
    "yaml.load": "yaml.load builds arbitrary objects; use yaml.safe_load", "yaml.unsafe_load": "unsafe YAML",
    "yaml.full_load": "full YAML loader", "sympify": "sympify evaluates strings", "sympy.sympify": "sympify",
    "parse_expr": "parse_expr evaluates strings", "os.system": "shell", "os.popen": "shell",
}
_BANNED_IMPORTS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def dangerous_calls(source: str) -> list[str]:
    """Calls that evaluate text or unpickle data, as ``line: call (why)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{node.lineno}: import {n}" for n in names if n and n.split(".")[0] in _BANNED_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in _BANNED_CALLS:
            found.append(f"{node.lineno}: {name} ({_BANNED_CALLS[name]})")
        elif name.endswith("torch.load"):
            weights_only = kwargs.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{node.lineno}: {name} without weights_only=True (unpickles)")
        elif name.endswith(("np.load", "numpy.load")):
            allow = kwargs.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{node.lineno}: {name} with allow_pickle")
        shell = kwargs.get("shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"{node.lineno}: {name} with shell=True")
        trust = kwargs.get("trust_remote_code")
        if isinstance(trust, ast.Constant) and trust.value is True:
            found.append(f"{node.lineno}: {name} with trust_remote_code=True")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    hostile = """
import pickle
from joblib import load
x = eval(text)
exec(code)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
yaml.load(stream)
subprocess.run(cmd, shell=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
sympy.sympify(answer)
"""
    assert len(dangerous_calls(hostile)) == 11, dangerous_calls(hostile)
    benign = """
model.eval()
re.compile(r"x")
torch.load(path, weights_only=True)
yaml.safe_load(stream)
AutoModel.from_pretrained(p, trust_remote_code=cfg["trust_remote_code"])
"""
    assert dangerous_calls(benign) == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_source_never_evaluates_or_unpickles(path: Path) -> None:
    assert dangerous_calls(path.read_text()) == []


HOSTILE = [
    "__import__('os').system('touch {canary}')",
    "exec(\"open('{canary}', 'w').write('x')\")",
    "eval(\"open('{canary}', 'w').write('x')\")",
    "(lambda: open('{canary}', 'w'))()",
    "().__class__.__base__.__subclasses__()",
]


@pytest.mark.parametrize("task_name", ["arithmetic", "gsm8k", "math", "mmlu"])
def test_model_output_is_parsed_never_evaluated(task_name: str, tmp_path: Path) -> None:
    from mft_ray.config import TaskConfig
    from mft_ray.society.voting import majority_vote, vote_rng
    from mft_ray.tasks import TASKS
    from mft_ray.tasks.answers import parse_number

    canary = tmp_path / "canary"
    task = TASKS[task_name](TaskConfig(name=task_name, path=None))
    for template in HOSTILE:
        code = template.format(canary=canary)
        for text in (code, f"The answer is \\boxed{{{code}}}", f"$\\boxed{{{code}}}$", f"The answer is ({code})"):
            answer = task.extract_answer(text)
            for a in {answer, code} - {None}:
                task.is_correct(a, "42")
                task.equivalent("42", a)
                task.equivalent(a, a + " ")
                parse_number(a)
            majority_vote([answer, code, code], task.equivalent, vote_rng(0, "p"))
    assert not canary.exists(), "model output was executed"


# -- trust_remote_code --------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_config() -> None:
    from mft_ray.config import Config, load_config

    assert Config().model.trust_remote_code is False
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        assert load_config(path).model.trust_remote_code is False, path.name


def test_model_loaders_pass_the_setting_through() -> None:
    # Every from_pretrained of a model or tokenizer in the engines, the training loops and the adapter merge
    # takes trust_remote_code from the config (never a literal); elsewhere (testbed, built-in models) it is
    # left at its default, False. (PEFT's PeftModel.from_pretrained loads adapter weights, never code.)
    passing = {"mft_ray/engines/hf.py", "mft_ray/training/loop.py", "mft_ray/training/joint_lora.py",
               "mft_ray/models/adapters.py"}
    seen = set()
    for path in _sources():
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            func = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
            if func.endswith("from_pretrained") and not func.startswith("PeftModel"):
                kwargs = {k.arg: k.value for k in node.keywords}
                if rel in passing:
                    assert "trust_remote_code" in kwargs, f"{rel}:{node.lineno}"
                    assert not isinstance(kwargs["trust_remote_code"], ast.Constant), f"{rel}:{node.lineno}"
                    seen.add(rel)
                else:
                    assert "trust_remote_code" not in kwargs, f"{rel}:{node.lineno}"
    assert seen == passing


@pytest.mark.parametrize("engine", ["hf", "vllm"])
@pytest.mark.parametrize("trust", [False, True])
def test_make_engine_hands_trust_remote_code_to_the_engine(engine: str, trust: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mft_ray.config import ModelConfig
    from mft_ray.engines import factory
    from mft_ray.engines.factory import make_engine

    seen: dict = {}

    class Recorder:
        def __init__(self, *args, **kwargs) -> None:
            seen.update(kwargs)

        def get_tokenizer(self) -> None:
            return None

    monkeypatch.setattr(factory, "HFEngine", Recorder)
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = Recorder
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    kwargs = {} if not trust else {"trust_remote_code": True}
    make_engine(ModelConfig(path="org/name", engine=engine, **kwargs))
    assert seen["trust_remote_code"] is trust


def test_finetune_hyperparameters_carry_trust_remote_code() -> None:
    from mft_ray.config import load_config
    from mft_ray.training.spec import training_spec

    for trust in (False, True):
        cfg = load_config(TINY, [f"model.trust_remote_code={str(trust).lower()}"])
        for role in ("generator", "critic"):
            assert training_spec(cfg, role, 1, 0).trust_remote_code is trust


# -- secrets -------------------------------------------------------------------------------------------


def test_the_config_has_no_place_for_a_secret() -> None:
    from mft_ray.config import Config

    def names(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                out += names(type(default), f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
        return out

    risky = [n for n in names(Config) if re.search(r"key|token(?!s)|secret|password|credential", n, re.I)]
    assert risky == ["model.api_key_env"]  # the name of an environment variable, never its value


PLANTED = {
    "OPENAI_API_KEY": "sk-planted-OPENAI-7f3a9c21e5",
    "HF_TOKEN": "hf_plantedHFTOKEN8b2d41f6",
    "HUGGING_FACE_HUB_TOKEN": "hf_plantedHUBTOKEN3c9e07",
    "AWS_SECRET_ACCESS_KEY": "planted-AWS-SECRET-5e1d8a",
}


def _leaks(blob: bytes) -> list[str]:
    return [name for name, value in PLANTED.items() if value.encode() in blob]


@pytest.fixture
def keyed_server(tiny_model: str):
    """The OpenAI-compatible test server on 127.0.0.1, answering only requests with the planted key."""
    from mft_ray.engines.hf import HFEngine
    from tests.openai_server import OpenAITestServer

    engine = HFEngine(tiny_model, dtype="float32", device="cpu")
    try:
        with OpenAITestServer(engine, model_name="tiny-llama", api_key=PLANTED["OPENAI_API_KEY"]) as server:
            yield server
    finally:
        engine.close()


def test_planted_secrets_never_reach_logs_or_the_run_directory(keyed_server, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="mftsec", dir="/tmp")  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PLANTED, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "jobs.evaluate", "--config", TINY, f"run_dir={run_dir}",
           "task.finetune_size=1", "task.eval_size=2", "debate.agents=2", "debate.rounds=2",
           "debate.shard_size=2", "sampling.max_new_tokens=8", "model.engine=openai", "model.path=tiny-llama",
           f"model.base_url={keyed_server.base_url}", "model.max_retries=1", "model.request_timeout_s=60"]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 0, stderr[-4000:]
        # The key really was used: the server answers nothing without it.
        assert keyed_server.requests
        assert all(r["authorization"] == f"Bearer {PLANTED['OPENAI_API_KEY']}" for r in keyed_server.requests)
        metrics = json.loads((run_dir / "iter_0" / "metrics.json").read_text())
        assert metrics["problems"] == 2

        leaks = {}
        if _leaks(done.stdout + done.stderr):
            leaks["job output"] = _leaks(done.stdout + done.stderr)
        searched = 0
        for root in (run_dir, Path(ray_tmp)):
            for path in root.rglob("*"):
                if path.is_symlink() or not path.is_file():
                    continue  # sockets, pipes
                blob = path.read_bytes()
                if path.suffix == ".parquet":  # compressed pages would hide a plain-text match
                    blob += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
                    blob += json.dumps({str(k): str(v) for k, v in
                                        (pq.read_metadata(path).metadata or {}).items()}).encode()
                if _leaks(blob):
                    leaks[str(path)] = _leaks(blob)
                searched += 1
        assert searched > 10  # the run dir and Ray's session logs were really there
        assert any(Path(ray_tmp).rglob("*.log")) or any(Path(ray_tmp).rglob("*.out"))
        assert leaks == {}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
