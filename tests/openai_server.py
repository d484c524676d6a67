"""A small OpenAI-compatible chat-completions server for tests: real HTTP on 127.0.0.1, a real model.

``OpenAITestServer(engine)`` serves ``POST /v1/chat/completions`` with any ``Engine`` (the tests use
the tiny local Llama through ``HFEngine``), one generation at a time. Knobs for the client's error
paths:

- ``faults``: a queue consumed one per request, before the normal reply. ``Fault(status=429,
  headers={"Retry-After": "1"})`` answers 429; ``Fault(sleep_s=2)`` stalls (longer than the client's
  timeout) and then answers normally; ``Fault(status=400, message=...)`` fails with that message.
- ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
- ``delay_s(body)``: seconds to wait before generating (to make requests finish out of order).

``requests`` records every request (path, Authorization header, JSON body) in arrival order and
``max_in_flight`` the most requests handled at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from mft_ray.engines.base import Engine, SamplingParams


@dataclass
class Fault:
    """One injected misbehaviour: optional stall, then an error status (None = answer normally)."""

    status: int | None = None
    message: str = "injected failure"
    headers: dict[str, str] = field(default_factory=dict)
    sleep_s: float = 0.0
    echo_authorization: bool = False  # put the request's Authorization header in the error text


class OpenAITestServer:
    """Serve ``engine`` as model ``model_name`` on 127.0.0.1 (a free port) until ``stop()``."""

    def __init__(self, engine: Engine, model_name: str = "tiny-llama", api_key: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.faults: deque[Fault] = deque()
        self.delay_s: Callable[[dict[str, Any]], float] = lambda body: 0.0
        self.requests: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._epoch = 0  # bumped by reset(): a request still stalled from an earlier test is not counted
        self._lock = threading.Lock()
        self._generate_lock = threading.Lock()  # one generation at a time: HFEngine is not thread-safe
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "OpenAITestServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget recorded requests and pending faults (between tests sharing one server)."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.max_in_flight = 0
            self._in_flight = 0
            self._epoch += 1
        self.delay_s = lambda body: 0.0

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        auth = handler.headers.get("Authorization")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        with self._lock:
            self.requests.append({"path": handler.path, "authorization": auth, "body": body})
            fault = self.faults.popleft() if self.faults else None
            epoch = self._epoch
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        released = []

        def release() -> None:
            # Before the reply's first byte: a client that gets its answer may send its next request before
            # this thread runs again, and that request must not count as a third one in flight.
            with self._lock:
                if not released and epoch == self._epoch:
                    self._in_flight -= 1
                released.append(True)

        handler.before_reply = release
        try:
            self._respond(handler, body, auth, fault)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout); nothing to answer
        finally:
            release()

    def _respond(self, handler: BaseHTTPRequestHandler, body: dict[str, Any] | None, auth: str | None,
                 fault: Fault | None) -> None:
        if fault is not None:
            time.sleep(fault.sleep_s)
            if fault.status is not None:
                message = fault.message + (f" (got Authorization: {auth})" if fault.echo_authorization else "")
                return _send_error(handler, fault.status, message, fault.headers)
        if handler.path.rstrip("/") != "/v1/chat/completions":
            return _send_error(handler, 404, f"no route {handler.path}")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return _send_error(handler, 401, "Incorrect API key provided.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _send_error(handler, 400, "body must be JSON with a 'messages' list")
        if body.get("model") != self.model_name:
            return _send_error(handler, 404, f"The model `{body.get('model')}` does not exist.")
        if body.get("n", 1) != 1:
            return _send_error(handler, 400, "only n=1 is served here")
        time.sleep(self.delay_s(body))
        params = SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                max_new_tokens=int(body.get("max_tokens") or 16), seed=int(body.get("seed") or 0))
        with self._generate_lock:
            text = self.engine.generate([body["messages"]], params)[0]
        reply = {
            "id": f"chatcmpl-test-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        _send_json(handler, 200, reply)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
                pass

        return Handler


def _send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode()
    getattr(handler, "before_reply", lambda: None)()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def _send_error(handler: BaseHTTPRequestHandler, status: int, message: str,
                headers: dict[str, str] | None = None) -> None:
    # OpenAI's error shape, which vLLM also uses.
    _send_json(handler, status, {"error": {"message": message, "type": "test_error", "code": status}}, headers)
