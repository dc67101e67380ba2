"""The three services as child processes (`python -m tally.cli NAME`), kept running.

A supervisor task restarts a service whenever it exits, as systemd or Kubernetes would:
at once after one of our SIGKILLs, after a second when it died by itself (that exit and
its code are recorded: the report names them). Each service logs to LOGS/LABEL.log (the
label is its name unless several instances of one service run). A service made with
`restart=False` stays down after an exit (a machine lost) until `start()` again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.paths import project_root

__all__ = ["Service", "ServiceStats", "service_env"]

RESTART_DELAY = 1.0  # after an exit we did not cause


@dataclass
class ServiceStats:
    starts: int = 0
    kills: int = 0
    exits: list[str] = field(default_factory=list)  # exits we did not cause: last log line
    stopped_cleanly: bool | None = None


def service_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child: ours, with the run's infrastructure settings on top."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **settings}


def last_line(path: Path, limit: int = 120) -> str:
    """The last non-blank line of a log: an exit's reason (the exception) is there."""
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - 4096))
        lines = log.read().decode(errors="replace").splitlines()
    found = [line for line in lines if line.strip()]
    return found[-1][:limit] if found else ""


class Service:
    """One service: started, killed on demand, restarted, stopped with SIGTERM at the end."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path, *,
                 label: str = "", restart: bool = True) -> None:
        self.name, self.args, self.env = name, args, env
        self.label, self.restart = label or name, restart
        self.log_path = logs / f"{self.label}.log"
        self.stats = ServiceStats()
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._killing = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stopping = False  # a stopped service may be started again
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.label}")

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def uptime(self) -> float:
        return asyncio.get_running_loop().time() - self.started_at if self.alive() else 0.0

    def kill(self) -> bool:
        """SIGKILL the running process (the supervisor restarts it, unless made with
        `restart=False`); False if none runs."""
        if self.process is None or not self.alive() or self._killing:
            return False
        self._killing = True
        self.process.send_signal(signal.SIGKILL)
        self.stats.kills += 1
        return True

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; a service that does not exit in time is killed and noted."""
        self._stopping = True
        if self.process is not None and self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._wait_task()), timeout)
        except TimeoutError:
            self.stats.stopped_cleanly = False
            if self.process is not None and self.alive():
                self.process.send_signal(signal.SIGKILL)
            await self._wait_task()

    async def exited(self) -> int | None:
        """The exit code, once the supervisor is done (a stop, or an exit of a service
        made with `restart=False`)."""
        await self._wait_task()
        return None if self.process is None else self.process.returncode

    async def _wait_task(self) -> None:
        if self._task is not None:
            await self._task

    async def _supervise(self) -> None:
        while not self._stopping:
            code = await self._run_once()
            if self._stopping:
                if self.stats.stopped_cleanly is None:
                    self.stats.stopped_cleanly = code == 0
                return
            if self._killing:
                self._killing = False
            else:
                self.stats.exits.append(f"code {code}: {last_line(self.log_path)}")
                if self.restart:
                    await asyncio.sleep(RESTART_DELAY)
            if not self.restart:
                return

    async def _run_once(self) -> int:
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.stats.starts + 1} ===\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tally.cli", self.name, *self.args,
                cwd=project_root(), env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.stats.starts += 1
        self.started_at = asyncio.get_running_loop().time()
        return await self.process.wait()
