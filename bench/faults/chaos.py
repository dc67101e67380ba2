"""The faults: SIGKILLs of the services at random moments, and one restart of the broker.

The broker is the project's own single-node Kafka (tally_dev.localkafka) in a data dir of its
own, never the developer's or the test session's: it is stopped (SIGTERM) and started
again while producers and services keep running.

Its port must lie below the kernel's ephemeral range (32768+ here): while it is down, the
clients keep dialling it, and a dial to a free ephemeral port on 127.0.0.1 can be given
that same port as its source (a TCP self-connect), which then holds it and the broker
cannot bind it again ("Address already in use", seen with 39092).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.faults.services import Service
from tally_dev import localkafka

__all__ = ["Broker", "Kill", "kill_on_schedule", "kill_plan", "low_free_port",
           "restart_broker_at"]

LOW_PORTS = range(20_000, 32_000)  # below the ephemeral range


def low_free_port(rng: random.Random | None = None) -> int:
    """A free port on 127.0.0.1 below the ephemeral range (see the module doc)."""
    rng = rng or random.Random()
    while True:
        port = rng.choice(LOW_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@dataclass(frozen=True)
class Broker:
    port: int
    controller_port: int
    data_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        return localkafka.start(self.port, self.controller_port, self.data_dir)

    def stop(self) -> bool:
        return localkafka.stop(self.data_dir)


@dataclass(frozen=True)
class Kill:
    at: float  # seconds after the run began
    service: str


def kill_plan(kills: int, names: tuple[str, ...], first: float, last: float,
              seed: int) -> list[Kill]:
    """`kills` moments in [first, last], the services taking turns in a shuffled order."""
    rng = random.Random(seed)
    targets = [names[i % len(names)] for i in range(kills)]
    rng.shuffle(targets)
    moments = sorted(rng.uniform(first, last) for _ in targets)
    return [Kill(at, name) for at, name in zip(moments, targets, strict=True)]


async def kill_on_schedule(plan: list[Kill], services: Mapping[str, Service],
                           began: float) -> int:
    """Carry out the plan; a kill that finds its service between lives waits for it."""
    loop, done = asyncio.get_running_loop(), 0
    for kill in plan:
        await asyncio.sleep(max(0.0, began + kill.at - loop.time()))
        while not services[kill.service].kill():
            await asyncio.sleep(0.05)
        done += 1
    return done


async def restart_broker_at(broker: Broker, at: float, began: float) -> float:
    """Stop the broker at `at` seconds into the run and start it again; the downtime."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, began + at - loop.time()))
    stopped = loop.time()
    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.start)
    return loop.time() - stopped
