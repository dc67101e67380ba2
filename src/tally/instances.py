"""Which service instances are running, and their share of the work: the instances topic.

Each instance of a service that scales out in a consumer group (the projector, the
enforcer) sends a small record, keyed by its instance id, every few
seconds: its role, where it serves HTTP, the partitions it owns, those it is restoring and
its lag per partition. The topic is compacted (a record per instance) and deletes records
after a day (instances long gone). A clean stop sends a tombstone. `tally status
--instances` reads it whole and lists the instances heard from lately.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import AwareDatetime, BaseModel

from tally.kafka import read_to_end
from tally.topics import Topics

__all__ = ["HEARTBEAT_S", "InstanceSeen", "format_instances", "heartbeat", "instance_id",
           "read_instances"]

HEARTBEAT_S = 2.0
SILENT_AFTER = timedelta(seconds=5 * HEARTBEAT_S)  # not heard from since: shown as silent


class InstanceSeen(BaseModel):
    """One heartbeat: what an instance owns and how far behind it is."""

    instance: str
    role: str
    url: str | None = None
    topic: str
    partitions: list[int]
    standby: bool = False  # a projector --standby: its file holds every partition
    restoring: list[int] = []
    lag: dict[str, int] = {}
    at: AwareDatetime


def instance_id(role: str, port: int | None) -> str:
    """Unique among the running instances: role, host and HTTP port (else process id),
    so an instance restarted in place replaces its own record."""
    return f"{role}@{socket.gethostname()}:{port or os.getpid()}"


async def heartbeat(producer: AIOKafkaProducer, topics: Topics, instance: str, role: str,
                    url: str | None, describe: Callable[[], dict[str, Any]],
                    every: float = HEARTBEAT_S) -> None:
    """Send this instance's record every `every` seconds until cancelled, then a tombstone
    (a stopped instance leaves the list at once)."""
    key = instance.encode()
    try:
        while True:
            seen = InstanceSeen(instance=instance, role=role, url=url,
                                at=datetime.now(UTC), **describe())
            await producer.send(topics.instances, key=key,
                                value=seen.model_dump_json().encode())
            await asyncio.sleep(every)
    finally:
        # Briefly: a stop must not wait on a broker that is away (the record then ages out).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(
                producer.send_and_wait(topics.instances, key=key, value=None)), 2)


async def read_instances(bootstrap: str, topics: Topics) -> list[InstanceSeen]:
    """The latest record of each instance not stopped (tombstones drop it)."""
    latest: dict[bytes, bytes | None] = {}
    for record in await read_to_end(bootstrap, topics.instances):
        if record.key is not None:
            latest[record.key] = record.value
    return sorted((InstanceSeen.model_validate_json(value) for value in latest.values()
                   if value is not None), key=lambda s: (s.role, s.instance))


def format_instances(seen: Iterable[InstanceSeen], now: datetime) -> str:
    """A table: instance, role (a standby marked), url, partitions owned, restoring, total
    lag, last heard."""
    rows = [("instance", "role", "url", "partitions", "restoring", "lag", "heard")]
    for s in seen:
        ago = (now - s.at).total_seconds()
        heard = f"{ago:.0f} s ago" + (" (silent)" if now - s.at > SILENT_AFTER else "")
        role = s.role + ("/standby" if s.standby else "")
        rows.append((s.instance, role, s.url or "-", _listed(s.partitions),
                     _listed(s.restoring), str(sum(s.lag.values())), heard))
    if len(rows) == 1:
        return "no instances running"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in rows)


def _listed(partitions: list[int]) -> str:
    return ",".join(map(str, partitions)) or "-"
