"""The one shape of a service: its parts run together, stop together, fail together.

A service's `run_<service>(..., stop)` sets itself up (topics, clients, its state), then
hands its parts (its loops and its HTTP server) to `run_parts`, which runs them in one
asyncio TaskGroup until `stop` is set: each part is then stopped, gracefully where it
says how. The first part to fail stops the others and its error is raised as itself. The
command (`tally ingest|projector|enforcer`) runs it under `run_service`: logging set up
once, SIGINT and SIGTERM set `stop`, and one exit code per cause (`tally.errors.ExitCode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn
from starlette.types import ASGIApp

from tally.errors import ExitCode, PortUnavailable, TallyError

__all__ = ["EscapingFormatter", "Part", "QuietServer", "bind", "configure_logging", "decimal",
           "error_text", "escape_controls", "http_part", "run_parts", "run_service",
           "serving", "started", "stop_on_signals", "watches_stop"]

log = logging.getLogger("tally.service")

Stop = Callable[[], Awaitable[None]]


async def watches_stop() -> None:
    """A part's `stop` when the part watches the service's `stop` Event itself and ends
    by itself once it is set (after finishing the work under way)."""


@dataclass(frozen=True)
class Part:
    """One of a service's concurrent parts: a loop, or its HTTP server."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    # How to ask it to stop; None: cancel it (work not committed is redone after a restart).
    stop: Stop | None = None


class PartEnded(RuntimeError):
    """A part returned while the service was not stopping: a bug, never a normal end."""


async def run_parts(stop: asyncio.Event, parts: Sequence[Part]) -> None:
    """Run `parts` until `stop` is set, then stop each. The first part to fail (or to end
    before `stop`) cancels the others, and its error is raised: unwrapped from the
    TaskGroup's ExceptionGroup, so callers catch the error itself."""

    async def supervised(part: Part) -> None:
        await part.run()
        if not stop.is_set():
            raise PartEnded(f"{part.name} ended unexpectedly")

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(supervised(part), name=part.name) for part in parts]
            await stop.wait()  # a failing part cancels this wait (the TaskGroup does)
            for part, task in zip(parts, tasks, strict=True):
                if part.stop is None:
                    task.cancel()
                else:
                    await part.stop()
    except BaseExceptionGroup as failed:
        raise _first(failed) from None


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that stopped the service; any others are logged (they came meanwhile)."""
    first, *others = group.exceptions
    for other in others:
        log.error("also failed while stopping: %s", error_text(other))
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def run_service(prog: str, service: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `service(stop)` until SIGINT or SIGTERM sets `stop`; its exit code. A TallyError
    (the config, the cluster) goes up to the CLI, which says it in one line; anything
    else is logged with its traceback and exits with ExitCode.FAILED."""
    configure_logging()

    async def until_signalled() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await service(stop)

    try:
        asyncio.run(until_signalled())
    except TallyError:
        raise
    except Exception:
        log.exception("%s stopped on an unforeseen error", prog)
        return ExitCode.FAILED
    log.info("%s stopped", prog)
    return ExitCode.OK


class _Client(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


C = TypeVar("C", bound=_Client)


@contextlib.asynccontextmanager
async def started(client: C) -> AsyncIterator[C]:
    """A Kafka client started for the block, stopped after it (even when it fails)."""
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


class EscapingFormatter(logging.Formatter):
    """Control characters in a message are escaped: a newline in a user id that reaches a
    log must not forge a line of its own. (Tracebacks keep their lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


def configure_logging() -> None:
    """One format for every service: time, logger, level, the message escaped."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # group chatter at INFO


def decimal(text: str) -> int | None:
    """An unsigned decimal integer in ASCII digits, or None. (str.isdigit() also accepts
    "²" or "٣", which int() then refuses.)"""
    return int(text) if text.isascii() and text.isdigit() else None


def error_text(error: BaseException) -> str:
    """An error in one bounded line, for a log: its type and the start of its message."""
    return f"{type(error).__name__}: {error!s:.300}"


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
    """Bound here, not by uvicorn, so a busy port raises (PortUnavailable, an OSError and
    an InputError: the CLI says it in one line) instead of sys.exit."""
    try:
        sock = socket.create_server((host, port))
    except OSError as error:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {error.strerror or error} "
                              "(pass --port, or set the service's TALLY_*_PORT)") from error
    sock.setblocking(False)
    return sock


def _server(app: ASGIApp) -> QuietServer:
    return QuietServer(uvicorn.Config(app, lifespan="off", log_level="warning",
                                      access_log=False))


def http_part(name: str, app: ASGIApp, sock: socket.socket, before_stop: Stop | None = None,
              ) -> Part:
    """`app` served on `sock` (bound beforehand: a busy port fails the start). Stopped
    gracefully: `before_stop` (e.g. ending open streams, or running queries), then the
    requests in flight finish."""
    server = _server(app)

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()

    async def stop() -> None:
        if before_stop is not None:
            await before_stop()
        server.should_exit = True

    return Part(name, serve, stop)


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, port: int, host: str = "127.0.0.1") -> AsyncIterator[None]:
    """Serve `app` in this event loop for as long as the block runs (tests' stand-ins)."""
    sock = bind(host, port)
    server = _server(app)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    try:
        yield None
    finally:
        server.should_exit = True
        await task
        sock.close()
