"""A network namespace with only loopback, and the few relays into and out of it.

The OpenClaw gateway reaches for the internet as it starts (a model catalog), so the tests
run it inside a namespace of its own that has nothing but `lo`: whatever it tries beyond
127.0.0.1 fails at once, and nothing leaves the machine. What it may reach is relayed:

- `serve_inside(port)`: a listening socket inside the namespace, served by this process
  (the fake upstream model server listens there directly);
- `relay_out(port)`: 127.0.0.1:port inside the namespace -> 127.0.0.1:port outside (the
  Kafka broker, which advertises 127.0.0.1:port, so the same port on both sides);
- `relay_in(inside_port)`: a free port outside -> 127.0.0.1:inside_port inside (the tests
  call the gateway's HTTP endpoint through it).

A namespace is held by a `sleep` started with `unshare --net` (root only); sockets are
made inside it by one thread that joined it with setns(2), and keep their namespace
wherever they are used afterwards. Processes join it with `nsenter --net`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["LoopbackNamespace", "NamespaceUnavailable"]

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class NamespaceUnavailable(RuntimeError):
    """This machine or user cannot make a network namespace."""


def _netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _join(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _connected(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


class LoopbackNamespace:
    """A network namespace whose only interface is `lo`, up. Use as a context manager."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NamespaceUnavailable("a network namespace needs root (unshare --net)")
        self._holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        self.path = f"/proc/{self._holder.pid}/ns/net"
        self._wait_unshared()
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, "netns", initializer=_join, initargs=(self.path,))
        self._thread.submit(_loopback_up).result()
        self._servers: list[asyncio.AbstractServer] = []

    def _wait_unshared(self) -> None:
        deadline = time.monotonic() + 10
        while _netns_inode(self._holder.pid) == _netns_inode("self"):
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise NamespaceUnavailable(f"unshare --net failed ({self._holder.returncode})")
            time.sleep(0.01)

    def __enter__(self) -> LoopbackNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._thread.shutdown(wait=False)
        self._holder.kill()
        self._holder.wait()

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace."""
        process: subprocess.Popen[bytes] = subprocess.Popen(
            ["nsenter", f"--net={self.path}", "--", *args], **kwargs)
        return process

    def listen_inside(self, port: int) -> socket.socket:
        """A non-blocking socket listening on 127.0.0.1:port inside the namespace."""
        return self._thread.submit(_listening, port).result()

    async def relay_out(self, port: int) -> None:
        """127.0.0.1:port inside the namespace reaches 127.0.0.1:port outside."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                outside = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            with contextlib.suppress(asyncio.CancelledError):
                await _splice((reader, writer), outside)

        self._servers.append(await asyncio.start_server(handle, sock=self.listen_inside(port)))

    async def relay_in(self, inside_port: int) -> int:
        """A port outside that reaches 127.0.0.1:inside_port inside; returns the port."""
        loop = asyncio.get_running_loop()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                sock = await loop.run_in_executor(self._thread, _connected, inside_port)
                inside = await asyncio.open_connection(sock=sock)
            except OSError:
                writer.close()
                return
            with contextlib.suppress(asyncio.CancelledError):
                await _splice((reader, writer), inside)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

