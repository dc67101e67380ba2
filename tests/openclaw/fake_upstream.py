"""A fake OpenAI-compatible model server: known usage, and a record of what was asked.

It answers POST /v1/chat/completions the way OpenClaw's `openai-completions` provider calls
it (always `stream: true` with `stream_options.include_usage`): one text chunk, a stop
chunk, then a usage chunk with `prompt_tokens` and `completion_tokens` fixed by the test.
Every request is recorded with the model asked for and the last user message, so a test
can tell which calls reached the upstream and with which model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from .served import Served

__all__ = ["FakeUpstream", "Request"]


@dataclass(frozen=True)
class Request:
    model: str
    prompt: str
    stream: bool


INTERNAL = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"


def last_user_text(body: dict[str, Any]) -> str:
    """The person's latest message (OpenClaw adds its own context as a user message after it,
    and stamps the person's text: "[Tue 2026-12-01 00:10 UTC] hello")."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if INTERNAL not in str(content):
            return str(content)
    return ""


class FakeUpstream:
    """Serve on an already listening socket (e.g. one inside a network namespace)."""

    def __init__(self, sock: socket.socket, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.delay = 0.0  # seconds before answering, to make calls overlap
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._served = Served(sock, self._handler())

    def start(self) -> FakeUpstream:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    def calls(self, marker: str = "") -> list[Request]:
        """The requests so far whose prompt contains `marker`."""
        with self._lock:
            return [r for r in self.requests if marker in r.prompt]

    def _record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(Request(str(body.get("model")), last_user_text(body),
                                         bool(body.get("stream"))))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"] or 0)))
                upstream._record(body)
                time.sleep(upstream.delay)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for chunk in upstream.chunks(str(body.get("model"))):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def chunks(self, model: str) -> list[dict[str, Any]]:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}
        text = {"role": "assistant", "content": f"Answer from {model}"}
        return [
            {**base, "choices": [{"index": 0, "delta": text, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**base, "choices": [], "usage": {
                "prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens}},
        ]
