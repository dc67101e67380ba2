"""What every service shell shares: signals, config at startup, a quiet HTTP server.

Each service's `main` loads its config with `load_config_or_report`, runs its
`run_<service>(..., stop)` coroutine under `stop_on_signals`, and serves HTTP, if any,
with `serving`, all in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from tally.config.errors import ConfigError
from tally.config.loader import load_config
from tally.config.models import Config
from tally.kafka import KafkaUnreachable
from tally.topiccheck import TopicsMisconfigured

__all__ = ["EscapingFormatter", "QuietServer", "bind", "configure_logging", "decimal", "error_text",
           "escape_controls", "load_config_or_report", "run_or_report", "serving",
           "stop_on_signals"]


class EscapingFormatter(logging.Formatter):
    """Control characters in a message are escaped: a newline in a user id that reaches a
    log must not forge a line of its own. (Tracebacks keep their lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def decimal(text: str) -> int | None:
    """An unsigned decimal integer in ASCII digits, or None. (str.isdigit() also accepts
    "²" or "٣", which int() then refuses.)"""
    return int(text) if text.isascii() and text.isdigit() else None


def error_text(error: BaseException) -> str:
    """An error in one bounded line, for a log: its type and the start of its message."""
    return f"{type(error).__name__}: {error!s:.300}"


def load_config_or_report(directory: Path, prog: str) -> Config | None:
    """The config, or None after printing every problem (file, key path, reason)."""
    try:
        return load_config(directory)
    except ConfigError as error:
        print(f"{prog}: refusing to start, the config in {directory} is invalid:\n{error}",
              file=sys.stderr)
        return None


def run_or_report(service: Coroutine[object, object, None], prog: str) -> int:
    """Run a service to its end; 1 after printing why, when the cluster refused it at
    start (unreachable, refused credentials, topics that would lose data)."""
    try:
        asyncio.run(service)
    except (KafkaUnreachable, TopicsMisconfigured) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    return 0


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM ask the running service to finish its batch and stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the service's `stop` Event owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bound here, not by uvicorn, so a busy port raises OSError instead of sys.exit."""
    sock = socket.create_server((host, port))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int, host: str = "127.0.0.1") -> AsyncIterator[None]:
    """Serve `app` in this event loop for as long as the block runs."""
    sock = bind(host, port)
    server = QuietServer(uvicorn.Config(app, lifespan="off", log_level="warning",
                                        access_log=False))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    try:
        yield None
    finally:
        server.should_exit = True
        await task
        sock.close()
