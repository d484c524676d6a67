"""Checks a job runs once, on the driver, before it touches the run directory or starts Ray, so that bad
input fails at once with a message naming the setting.

Each config dataclass checks only its own fields when built (``mft_ray.config``) and data files are
checked when the task loads them (``mft_ray.tasks``). What needs a look outside the config is here
(``check_config``): names against the registries (methods, built-in models), files and model directories
on this disk, whether an OpenAI-compatible endpoint accepts connections, and the problems of the config's
resource plan (``mft_ray.run.plan``: finetunes on CPU behind GPU inference, a finetune estimated over the GPU
memory); and whether the splits the job is about to use hold any problems (``require_problems``).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import urllib.request
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from mft_ray.config import Config, ModelConfig
from mft_ray.errors import ConfigError
from mft_ray.methods.registry import get_method
from mft_ray.models.builtin import validate_model_path
from mft_ray.run.plan import resource_plan

logger = logging.getLogger(__name__)

_SKIP_HINT = "(if only the cluster's nodes can reach it, set model.check_endpoint=false)"


def check_config(config: Config, endpoint: bool = True, finetunes: bool = True) -> None:
    """Refuse a config that names something that is not there: an unknown method, a missing data file, a
    model path that holds no model, or (``endpoint``) an OpenAI-compatible server that accepts no
    connection; or whose resource plan has problems (``check_resources``). ``finetunes=False`` for jobs that
    never finetune (debate, evaluate, the service): their finetune settings are not checked."""
    get_method(config.method)
    for key in ("path", "eval_path"):
        value = getattr(config.task, key)
        if value is not None and not Path(value).expanduser().is_file():
            raise ConfigError(f"task.{key}: no such file: {value}")
    model = config.model
    if model.engine != "openai":
        validate_model_path(model.path, "model.path")
    if config.metrics.nll_model is not None:
        validate_model_path(config.metrics.nll_model, "metrics.nll_model")
    check_resources(config, finetunes)
    if endpoint:
        check_model_endpoint(model)


def check_resources(config: Config, finetunes: bool = True) -> None:
    """Refuse what ``mft_ray.run.plan.resource_plan`` finds without a cluster: inference on GPUs while the
    finetunes would train on CPU, a finetune whose estimated memory per GPU exceeds
    ``resources.gpu_memory_gb``, vLLM engines that cannot share or fit a GPU. The cluster itself is checked
    once Ray is up (``actors.placement``, ``actors.finetune.check_finetunes_fit``)."""
    if not finetunes:
        config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, iterations=0))
    problems = resource_plan(config).problems
    if problems:
        raise ConfigError("; ".join(problems) + " (see `mft plan --config ...`)")


def check_model_endpoint(model: ModelConfig) -> None:
    """For ``engine: openai`` (unless ``model.check_endpoint`` is off): refuse a ``base_url`` that accepts
    no connection."""
    if model.engine == "openai" and model.check_endpoint and model.base_url:
        check_endpoint(model.base_url, timeout_s=min(model.request_timeout_s, 10.0))


def require_problems(problems: Sequence[object], split: str, purpose: str | None = None) -> None:
    """Refuse an empty split (``finetune`` or ``eval``): a job that debates or evaluates nothing would only
    write empty output. ``purpose`` says what the split is for, in the message."""
    if not problems:
        purpose = purpose or ("to evaluate" if split == "eval" else "to debate")
        raise ConfigError(f"task.{split}_size is 0: the {split} split is empty, so there is nothing {purpose}; "
                          f"set task.{split}_size >= 1")


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe to print (a key may hide in any of them)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def check_endpoint(url: str, timeout_s: float = 10.0, setting: str = "model.base_url") -> None:
    """Raise ConfigError naming ``setting`` if nothing accepts a TCP connection at ``url``'s host and port.

    Only the connection is tried (no request is sent, no key is needed), within ``timeout_s``. When a
    proxy applies to the URL the client goes through it, so the direct check is skipped.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ConfigError(f"{setting} has no host: {public_url(url)!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"{setting} has a bad port: {public_url(url)!r} ({exc})") from None
    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme) and not urllib.request.proxy_bypass(host):
        logger.info("%s: %s goes through a proxy; not checking it directly", setting, public_url(url))
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.gaierror as exc:
        raise ConfigError(f"{setting}: cannot resolve host {host!r} of {public_url(url)} "
                          f"({exc.strerror or exc})") from None
    except TimeoutError:
        raise ConfigError(f"{setting}: {public_url(url)} did not accept a connection within {timeout_s:g}s; "
                          f"{_SKIP_HINT}") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot connect to {public_url(url)} ({exc.strerror or exc}); is the "
                          f"server running? {_SKIP_HINT}") from None
    logger.info("%s: %s accepts connections", setting, public_url(url))
