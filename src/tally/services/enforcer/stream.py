"""Server-sent events for the live dashboard: one `Hub`, one queue per open stream.

A stream starts with a `snapshot` event (every row and the recent alerts), then carries a
`decision` event per changed decision and an `alert` event per new alert, as the enforcer
publishes them. A `: keepalive` comment goes out when nothing happened for a while, so a
dead connection is noticed by both ends.

A stream that falls `max_queue` events behind is closed rather than waited for (the
enforcer's loop never blocks on a browser); the dashboard reconnects and gets a fresh
snapshot, which makes up for whatever it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson

__all__ = ["Hub", "sse_frame"]

KEEPALIVE = b": keepalive\n\n"


def sse_frame(event: str, data: object) -> bytes:
    """One SSE message; orjson never writes a raw newline, so `data` is one line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Hub:
    """Fans frames out to every open stream; `close` ends them all (before a shutdown)."""

    def __init__(self, max_queue: int = 10_000, keepalive_seconds: float = 15.0) -> None:
        self.max_queue = max_queue
        self.keepalive_seconds = keepalive_seconds
        self._queues: set[asyncio.Queue[bytes | None]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._queues)

    def publish(self, frames: list[bytes]) -> None:
        for queue in list(self._queues):
            for frame in frames:
                if queue.qsize() >= self.max_queue:
                    self._drop(queue)
                    break
                queue.put_nowait(frame)

    def close(self) -> None:
        """End every stream: uvicorn's graceful shutdown waits for open responses."""
        self.closed = True
        for queue in list(self._queues):
            self._drop(queue)

    def _drop(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._queues.discard(queue)
        queue.put_nowait(None)  # the queue has no maxsize: the end mark always fits

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        """A new stream's queue. Build its snapshot right after, with no await between,
        so that nothing published after the snapshot is missed."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queues.add(queue)
        if self.closed:
            self._drop(queue)
        return queue

    async def stream(self, queue: asyncio.Queue[bytes | None],
                     first: bytes) -> AsyncIterator[bytes]:
        """`first` (the snapshot), then every frame published until dropped or closed."""
        try:
            yield first
            while (frame := await self._next(queue)) is not None:
                yield frame
        finally:
            self._queues.discard(queue)

    async def _next(self, queue: asyncio.Queue[bytes | None]) -> bytes | None:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(queue.get(), self.keepalive_seconds)
        return KEEPALIVE
