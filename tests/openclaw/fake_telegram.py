"""A fake Telegram Bot API: OpenClaw's own Telegram channel, on loopback.

OpenClaw's Telegram channel (grammY) takes its API root from `channels.telegram.apiRoot`
(meant for self-hosted Bot API servers). This server answers the calls it makes: `getMe`,
`getUpdates` (the messages a test queues with `send`, as direct messages from one person),
`sendMessage` (recorded: the replies the person would read) and `true` for everything else
(chat actions, commands, webhooks).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from .served import Served

__all__ = ["FakeTelegram"]

BOT_TOKEN = "7000000001:AAtallytesttokenaaaaaaaaaaaaaaaaaaa"
BOT = {"id": 7000000001, "is_bot": True, "first_name": "Tally test", "username": "tally_test_bot",
       "can_join_groups": False, "can_read_all_group_messages": False,
       "supports_inline_queries": False}


class FakeTelegram:
    """Serve on an already listening socket (e.g. one inside a network namespace)."""

    def __init__(self, sock: socket.socket) -> None:
        self.replies: list[tuple[int, str]] = []  # (chat id, text) of every sendMessage
        self.calls: list[str] = []  # every method called, in order
        self._updates: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._served = Served(sock, self._handler())

    def start(self) -> FakeTelegram:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    def send(self, user_id: int, text: str) -> None:
        """A direct message from `user_id` to the bot."""
        with self._changed:
            n = len(self._updates) + 1
            self._updates.append({"update_id": n, "message": {
                "message_id": n, "date": int(time.time()), "text": text,
                "chat": {"id": user_id, "type": "private", "first_name": f"user{user_id}"},
                "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}}})
            self._changed.notify_all()

    def replies_to(self, user_id: int) -> list[str]:
        with self._changed:
            return [text for chat, text in self.replies if chat == user_id]

    def _answer(self, method: str, body: dict[str, Any]) -> Any:
        with self._changed:
            self.calls.append(method)
        if method == "getMe":
            return BOT
        if method == "getUpdates":
            return self._updates_after(int(body.get("offset") or 0))
        if method == "sendMessage":
            chat, text = int(body["chat_id"]), str(body.get("text", ""))
            with self._changed:
                self.replies.append((chat, text))
                n = len(self.replies)
            return {"message_id": 10_000 + n, "date": int(time.time()), "text": text,
                    "chat": {"id": chat, "type": "private"}, "from": BOT}
        return True

    def _updates_after(self, offset: int) -> list[dict[str, Any]]:
        """Long polling, shortened: wait up to a second for an update at or after `offset`."""
        with self._changed:
            self._changed.wait_for(
                lambda: any(u["update_id"] >= offset for u in self._updates), timeout=1.0)
            return [u for u in self._updates if u["update_id"] >= offset]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        telegram = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                kind = self.headers.get("content-type", "")
                body = json.loads(raw) if raw and kind.startswith("application/json") else {}
                self._reply(body)

            def do_GET(self) -> None:
                self._reply({})

            def _reply(self, body: dict[str, Any]) -> None:
                method = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
                answer = json.dumps({"ok": True, "result": telegram._answer(method, body)})
                data = answer.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                # A long poll the gateway gave up on (e.g. while it stops) finds no one.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
