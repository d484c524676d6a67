"""Checks a job runs before it touches the run directory or starts Ray, so that bad input fails at once.

Config values are checked when the config is built (``mft_ray.config``) and data files when the task
loads them (``mft_ray.tasks``). What is left needs a look outside the config: whether the splits the
job is about to use hold any problems, and whether an OpenAI-compatible endpoint accepts connections.
"""

from __future__ import annotations

import logging
import socket
import urllib.request
from typing import Sequence
from urllib.parse import urlsplit

from mft_ray.config import ConfigError

logger = logging.getLogger(__name__)

_SKIP_HINT = "(if only the cluster's nodes can reach it, set model.check_endpoint=false)"


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
