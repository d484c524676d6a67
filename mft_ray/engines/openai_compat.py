"""OpenAI-compatible chat-completions engine: hosted models (GPT-3.5 style) or any server that speaks the
same protocol (vLLM's ``vllm serve``, SGLang, llama.cpp's server, ...).

The official ``openai`` client (a vLLM dependency) sends the requests: one per conversation, at most
``max_concurrency`` in flight per engine (a thread pool over one client). Retries are ours, not the
client's (it runs with ``max_retries=0``): requests that fail with 408, 429, 5xx, a connection error or a
timeout are retried with exponential backoff and jitter (a ``Retry-After`` or ``retry-after-ms`` header
from the server wins, capped at ``MAX_RETRY_WAIT_S``), any other status fails at once, and a request that
failed for good stops the rest of its batch, which the client's own retry loop cannot do. The API key is
read from the environment variable named in the config and is never logged or put in an error message.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx2 as httpx  # the HTTP library of the openai client (httpx 2)
import openai

from mft_ray.engines.base import Conversation, Engine, SamplingParams, adapter_list
from mft_ray.errors import EngineError, ScoringNotSupported

logger = logging.getLogger(__name__)

# A Retry-After longer than this is not honoured in full: a run must never sit idle for an hour
# because a proxy said so; the next attempt simply finds out again.
MAX_RETRY_WAIT_S = 60.0
_SERVER_MESSAGE_CHARS = 500
# 408 is the server timing out waiting for the request: a timeout like any other, so retried.
_RETRY_4XX = (408, 429)


class _Aborted(Exception):
    """Another request of the same batch failed for good; this one stops retrying."""


def _loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_url(url: str) -> str:
    """``url`` without any user:password part, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class OpenAIEngine(Engine):
    """Chat completions over HTTP: ``POST {base_url}/chat/completions``, one request per conversation.

    Args:
        model: the model name the server knows (``gpt-3.5-turbo-0125``, ``ft:...`` for a hosted
            finetune, or what ``vllm serve`` was given, by default its model path).
        base_url: the API root including the version, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1``.
        api_key_env: name of the environment variable that holds the key. The key may be absent
            (local servers need none); then no ``Authorization`` header is sent.
        timeout_s: socket timeout of one attempt (connecting, and each wait for data).
        max_retries: attempts after the first one for retryable failures (408, 429, 5xx, connection
            errors, timeouts).
        backoff_s: first retry delay; it doubles per attempt, with jitter, up to ``max_backoff_s``
            (which also caps a server's ``Retry-After``).
        max_concurrency: requests in flight at once from this engine.

    Each request carries its own seed, ``sampling.derive("request", index).seed``: identical conversations in one
    batch (several agents answering the same question) must not receive identical samples from a
    server that honours ``seed``, and a rerun of the same batch asks for the same seeds.
    """

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_s: float = 1.0, max_concurrency: int = 8,
                 max_backoff_s: float = MAX_RETRY_WAIT_S) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineError(f"base_url must be an http(s) URL, got {_public_url(base_url)!r}")
        if not model:
            raise EngineError("the engine needs a model name (model.path)")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise EngineError("max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0")
        self.model_path = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.public_url = _public_url(self.url)
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max_concurrency
        self._key = os.environ.get(api_key_env) or None  # private: never formatted into text
        if self._key is not None and parts.scheme == "http" and not _loopback(parts.hostname):
            logger.warning("OpenAI engine: sending the API key from $%s over plain http to %s",
                           api_key_env, parts.hostname)
        # Without a key no Authorization header is sent at all (local servers need none); the client
        # insists on a key, so it gets a placeholder that each request then omits.
        self._extra_headers = None if self._key is not None else {"Authorization": openai.omit}
        # Redirects are not followed: a redirected POST could lose its body or carry the key elsewhere.
        self._client = openai.OpenAI(
            api_key=self._key or "unused", base_url=base_url.rstrip("/"), timeout=timeout_s, max_retries=0,
            http_client=httpx.Client(follow_redirects=False, timeout=timeout_s,
                                     limits=httpx.Limits(max_connections=max_concurrency)))
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openai-engine")
        self._rng = random.Random()  # jitter only; not the sampling seed
        self._usage_lock = threading.Lock()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        logger.info("OpenAI engine: model %s at %s (key from $%s: %s; %d concurrent, timeout %.0fs, %d retries)",
                    model, self.public_url, api_key_env, "set" if self._key else "not set", max_concurrency,
                    timeout_s, max_retries)

    # -- public API ---------------------------------------------------------------------------------

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[str]:
        """One reply per conversation, in order; raises ``EngineError`` if any request fails for good."""
        if not conversations:
            return []
        adapter_list(adapters, len(conversations), ())  # a served model has no local LoRA adapters
        abort = threading.Event()
        futures: list[Future[str]] = [
            self._pool.submit(self._complete, conv, sampling, sampling.derive("request", i).seed, abort)
            for i, conv in enumerate(conversations)
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            # Stop the rest of the batch: queued requests are dropped, running ones stop retrying. Their
            # current attempt is awaited (at most one timeout), so that no request of this call is
            # still in flight once it has raised.
            abort.set()
            for f in futures:
                f.cancel()
            wait(futures)
            exc = failed.exception()
            if isinstance(exc, EngineError):
                raise exc
            raise EngineError(f"POST {self.public_url}: {self._redact(repr(exc))}") from exc
        return [f.result() for f in futures]

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str],
              adapter: str | None = None) -> list[float | None]:
        """Not possible here: chat completions return no log-probabilities of text the caller supplies."""
        raise ScoringNotSupported(f"engine 'openai' ({self.model_path}) cannot score given text: chat completions "
                                  "return no log-probs of a supplied reply; set metrics.nll_problems=0 or "
                                  "metrics.nll_model to a local checkpoint")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- one request --------------------------------------------------------------------------------

    def _complete(self, conversation: Conversation, sampling: SamplingParams, seed: int,
                  abort: threading.Event) -> str:
        request = {
            "model": self.model_path,
            # Only role and content: finetuning examples carry extra keys ("weight") servers reject.
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": seed,
            "n": 1,
        }
        reply = self._create(request, abort)
        try:
            choice = reply.choices[0]
            content = choice.message.content
        except (IndexError, TypeError, AttributeError) as exc:
            raise EngineError(f"POST {self.public_url}: unexpected response shape "
                              f"{self._redact(str(reply)[:_SERVER_MESSAGE_CHARS])}") from exc
        if content is None:
            # A refusal or a content filter: an empty reply parses as "no answer", which the vote handles.
            logger.warning("OpenAI engine: empty content (finish_reason=%s)", choice.finish_reason)
            content = ""
        usage = reply.usage
        with self._usage_lock:
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.usage["completion_tokens"] += int(getattr(usage, "completion_tokens", 0) or 0)
        return content

    def _create(self, request: dict[str, Any], abort: threading.Event) -> Any:
        """One chat completion with retries: the client's reply object, or ``EngineError``."""
        attempts = self.max_retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            if abort.is_set():
                raise _Aborted
            retry_after: float | None = None
            try:
                return self._client.chat.completions.create(**request, extra_headers=self._extra_headers)
            except openai.APIStatusError as exc:
                code = exc.status_code
                message = self._server_message(exc.response)
                reason = exc.response.reason_phrase
                if code not in _RETRY_4XX and code < 500:
                    raise EngineError(self._client_error(code, reason, message)) from None
                last = f"HTTP {code} {reason}: {message}"
                retry_after = _retry_after(exc.response.headers)
            except openai.APITimeoutError:
                last = f"timed out after {self.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                # The transport's own error (a refused connection, a dropped one) says more than the client's.
                cause = exc.__cause__ or exc
                last = self._redact(f"{type(cause).__name__}: {cause}")
            except openai.APIResponseValidationError as exc:
                raise EngineError(f"POST {self.public_url}: unexpected response: "
                                  f"{self._redact(str(exc)[:_SERVER_MESSAGE_CHARS])}") from None
            if attempt + 1 == attempts:
                break
            delay = self._delay(attempt, retry_after)
            logger.warning("POST %s: %s (attempt %d/%d); retrying in %.2fs", self.public_url, last,
                           attempt + 1, attempts, delay)
            if abort.wait(delay):
                raise _Aborted
        raise EngineError(f"POST {self.public_url} failed after {attempts} attempt(s); last error: {last}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        base = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        # Jitter spreads the retries of many concurrent requests that failed together.
        return base * (0.5 + 0.5 * self._rng.random())

    def _server_message(self, response: httpx.Response) -> str:
        """The server's error text: OpenAI's ``{"error": {"message": ...}}`` or the body's start."""
        try:
            text = response.text
        except (httpx.HTTPError, UnicodeDecodeError):
            return "(no body)"
        try:
            payload = json.loads(text)
            err = payload.get("error", payload) if isinstance(payload, dict) else payload
            if isinstance(err, dict):
                text = str(err.get("message") or err.get("detail") or err)
            elif isinstance(err, str):
                text = err
        except ValueError:
            pass
        return self._redact(text.strip()[:_SERVER_MESSAGE_CHARS]) or "(no body)"

    def _client_error(self, code: int, reason: str, message: str) -> str:
        text = f"POST {self.public_url}: HTTP {code} {reason}: {message}"
        if code in (401, 403):
            text += f" (API key from ${self.api_key_env}: {'set' if self._key else 'not set'})"
        elif 300 <= code < 400:
            text += " (redirects are not followed; check model.base_url)"
        return text

    def _redact(self, text: str) -> str:
        # A server may echo what it was sent (some proxies quote the Authorization header).
        return text.replace(self._key, "[redacted]") if self._key else text


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()
