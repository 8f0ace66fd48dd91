"""Local network helpers for engine tests: a free port, and a fake OpenAI completions server on 127.0.0.1.

The fake server answers /v1/completions like vLLM's server does, and records
what a client did to it: how many requests were in flight at once, and how
often each prompt was sent (a retried request arrives twice; a prompt of token
ids is counted under the tuple of its ids).
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    """A port nothing listens on right now (for a dead server, or one started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCompletionsServer:
    """A threaded fake of an OpenAI-compatible /v1/completions endpoint.

    `gather`: hold each request until this many are in flight together (a
    serial client never gets there and is answered 500 after `gather_timeout`).
    `stall`: prompt -> seconds to sleep before answering its first request
    (longer than the client's timeout makes that request time out).
    `status`: answer every request with this HTTP status instead.
    `fail_on`: answer 500 to every prompt that contains one of these texts.
    """

    def __init__(self, gather: int = 0, gather_timeout: float = 20.0, stall: dict[str, float] | None = None,
                 status: int | None = None, fail_on: tuple[str, ...] = ()):
        self.barrier = threading.Barrier(gather, timeout=gather_timeout) if gather else None
        self.stall, self.status, self.fail_on = dict(stall or {}), status, fail_on
        self.requests: collections.Counter = collections.Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeCompletionsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, body: dict) -> tuple[int, dict]:
        prompt = body["prompt"]
        if not isinstance(prompt, str):  # token ids: recorded as a tuple, answered by their count
            prompt = tuple(prompt)
        with self._lock:
            self.requests[prompt] += 1
            first = self.requests[prompt] == 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.status is not None:
                return self.status, {"error": {"message": "scripted failure"}}
            if isinstance(prompt, str) and any(text in prompt for text in self.fail_on):
                return 500, {"error": {"message": "scripted failure of this prompt"}}
            if first and prompt in self.stall:
                time.sleep(self.stall[prompt])
            if self.barrier is not None:
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    return 500, {"error": {"message": "requests did not arrive together"}}
            tokens = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
            return 200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "text": f" rewrite of {prompt}", "finish_reason": "stop",
                                      "logprobs": None}],
                         "usage": {"prompt_tokens": tokens, "completion_tokens": 3, "total_tokens": tokens + 3,
                                   "prompt_tokens_details": {"cached_tokens": 1}}}
        finally:
            with self._lock:
                self.in_flight -= 1

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server._answer(body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "10")  # the openai client's backoff follows it
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (its timeout): nothing to answer

            def log_message(self, *args) -> None:
                pass

        return Handler
