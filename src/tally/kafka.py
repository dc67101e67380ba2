"""The narrow Kafka seam every service shares: topic setup, producers, batch reads.

Built on aiokafka, not FastStream, where a service reads in bulk or keeps its own offsets.
Reading 200,000 records of usage.events and doing nothing with them
(`python -m bench.faststream_fit`, bench/RESULTS.md, 2 cores under load 11): aiokafka's
`getmany` of 10,000 (`batches` below) 212,000 records/s; FastStream's batch subscriber
75,000/s (2.8x slower: its per-message wrapping, acks and middlewares); its per-message
subscriber 1,400/s (150x slower). The ingest, the projector and the enforcer read
in batches of up to 10,000 (replay reads whole topics with librdkafka instead:
tally.kafka_bulk), and the projector also seeks, on each assignment of its group, to the
offsets stored in DuckDB with its results (exactly-once): a consumer group's commits
cannot hold them. Only the notifier, one alert at a time in a consumer group with
a commit after each, fits FastStream, and uses it (enforcer/notifier.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition, errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from tally.errors import ClusterError
from tally.settings import KafkaSecurity
from tally.topiccheck import Difference, FoundTopic, TopicsMisconfigured, compare
from tally.topics import Topics

__all__ = [
    "CatchUp",
    "KafkaUnreachable",
    "Record",
    "apply_topics",
    "batches",
    "check_topics",
    "commit_offsets",
    "end_offsets",
    "ensure_topics",
    "faststream_security",
    "fetch",
    "make_admin",
    "make_consumer",
    "make_producer",
    "next_offsets",
    "partitions_of",
    "read_to_end",
    "security_options",
]

log = logging.getLogger(__name__)

DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source: set on the topic itself


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message, stripped to what the services use."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int

    @property
    def source(self) -> str:
        """Where the record is, as logs and the DLQ name it: "kafka:usage.raw[0]@42"."""
        return f"kafka:{self.topic}[{self.partition}]@{self.offset}"


def security_options(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """aiokafka's connection settings for SASL and TLS (default: from the environment,
    KAFKA_SECURITY_PROTOCOL and the others, see tally.settings)."""
    security = security or KafkaSecurity.from_env()
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.sasl:
        options |= {"sasl_mechanism": security.sasl_mechanism,
                    "sasl_plain_username": security.sasl_username,
                    "sasl_plain_password": security.sasl_password}
    if security.tls:
        options["ssl_context"] = create_ssl_context(
            cafile=security.ssl_ca_file, certfile=security.ssl_cert_file,
            keyfile=security.ssl_key_file, password=security.ssl_key_password)
    return options


def faststream_security(security: KafkaSecurity | None = None) -> BaseSecurity | None:
    """The same settings for a FastStream KafkaBroker (the notifier's)."""
    security = security or KafkaSecurity.from_env()
    context = (create_ssl_context(cafile=security.ssl_ca_file, certfile=security.ssl_cert_file,
                                  keyfile=security.ssl_key_file,
                                  password=security.ssl_key_password)
               if security.tls else None)
    if not security.sasl:
        return BaseSecurity(ssl_context=context) if context else None
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256,
            "SCRAM-SHA-512": SASLScram512}[security.sasl_mechanism]
    return sasl(str(security.sasl_username), str(security.sasl_password),
                ssl_context=context, use_ssl=security.tls)


def make_admin(bootstrap: str, security: KafkaSecurity | None = None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security_options(security))


async def ensure_topics(bootstrap: str, topics: Topics, partitions: int) -> None:
    """Create the missing topics as the topic table says, then check the existing ones:
    raise TopicsMisconfigured where a difference loses data or repeats alerts, log the
    smaller differences as warnings."""
    async with _admin(bootstrap) as admin:
        await _create_missing(admin, topics, partitions)
        differences = await _compare_created(admin, bootstrap, topics, partitions)
    refusing = [d for d in differences if d.refuses]
    if refusing:
        raise TopicsMisconfigured(refusing)
    for difference in differences:
        log.warning("topic setting differs from the table:\n%s", difference.describe())


async def check_topics(bootstrap: str, topics: Topics, partitions: int) -> list[Difference]:
    """Every difference between the cluster's topics and the table (`tally topics check`)."""
    async with _admin(bootstrap) as admin:
        return await _compare(admin, bootstrap, topics, partitions)


async def apply_topics(bootstrap: str, topics: Topics, partitions: int) -> list[Difference]:
    """Create the missing topics and make the safe config changes (`tally topics apply`);
    the differences left, which need a hand (their `fix`)."""
    async with _admin(bootstrap) as admin:
        await _create_missing(admin, topics, partitions)
        differences = await _compare(admin, bootstrap, topics, partitions)
        await _alter(admin, topics, [d for d in differences if d.safe])
        for _ in range(50):  # altered configs reach the brokers' metadata asynchronously
            if not any(d.safe for d in differences):
                break
            await asyncio.sleep(0.1)
            differences = await _compare(admin, bootstrap, topics, partitions)
        return differences


class KafkaUnreachable(ClusterError):
    """No connection to the cluster: down, wrong address, or refused credentials."""


async def why_unreachable(bootstrap: str, security: KafkaSecurity | None = None) -> str:
    """The broker's own reason (refused credentials, TLS failure, nothing listening),
    which aiokafka logs but does not raise: one direct connection to the first server."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    options = security_options(security)
    try:
        conn = await create_conn(host, int(port), request_timeout_ms=10_000, **options)
    except Exception as error:  # whatever it is, it is the answer
        return f"{type(error).__name__}: {error}"
    conn.close()
    return "it answers now (it may have been starting)"


async def started_admin(bootstrap: str,
                        security: KafkaSecurity | None = None) -> AIOKafkaAdminClient:
    """An admin client connected to the cluster, or KafkaUnreachable saying why not."""
    admin = make_admin(bootstrap, security)
    try:
        await admin.start()
    except KafkaConnectionError as error:
        await admin.close()
        security = security or KafkaSecurity.from_env()
        who = f" as {security.sasl_username!r}" if security.sasl else ""
        reason = await why_unreachable(bootstrap, security)
        raise KafkaUnreachable(f"cannot connect to Kafka at {bootstrap} over "
                               f"{security.protocol}{who}: {reason}") from error
    return admin


@contextlib.asynccontextmanager
async def _admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = await started_admin(bootstrap)
    try:
        yield admin
    finally:
        await admin.close()


async def _create_missing(admin: AIOKafkaAdminClient, topics: Topics, partitions: int) -> None:
    existing = set(await admin.list_topics())
    missing = {name: spec for name, spec in topics.specs().items() if name not in existing}
    if not missing:
        return
    replicas = topics.replication_factor or await _default_replicas(admin)
    await _create(admin, [NewTopic(name, partitions, replicas, topic_configs=spec.configs(replicas))
                          for name, spec in missing.items()])


async def _default_replicas(admin: AIOKafkaAdminClient) -> int:
    """The broker's default.replication.factor (what a topic gets when none is said)."""
    broker = (await admin.describe_cluster())["brokers"][0]["node_id"]
    resource = ConfigResource(ConfigResourceType.BROKER, str(broker),
                              {"default.replication.factor": None})
    try:
        (response,) = await admin.describe_configs([resource])
        entries = response.to_object()["resources"][0]["config_entries"]
        return int(entries[0]["config_value"])
    except (KafkaError, IndexError, KeyError, ValueError) as error:  # e.g. not allowed
        raise KafkaUnreachable(
            f"cannot read the brokers' default.replication.factor to create the topics "
            f"({error!r}); set TALLY_REPLICATION_FACTOR") from error


CREATE_PATIENCE_S = 60.0  # a cluster that has just started may still be registering brokers


async def _create(admin: AIOKafkaAdminClient, wanted: list[NewTopic]) -> None:
    """Create the topics. The controller answers per topic, without raising: a cluster
    that has just started refuses a replication factor its brokers cannot hold yet
    (INVALID_REPLICATION_FACTOR), so refusals are retried for CREATE_PATIENCE_S, then
    named. Then wait until the metadata shows them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CREATE_PATIENCE_S
    pending = wanted
    while pending:
        refused = await _refused(admin, pending)
        if refused and loop.time() > deadline:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in sorted(refused.items()))
            raise KafkaUnreachable(f"the cluster refused to create the topics: {reasons}")
        pending = [topic for topic in pending if topic.name in refused]
        if pending:
            await asyncio.sleep(1.0)
    names = {t.name for t in wanted}
    while not names <= set(await admin.list_topics()):  # metadata propagates after create
        if loop.time() > deadline:
            raise KafkaUnreachable(f"created topics did not appear: {sorted(names)}")
        await asyncio.sleep(0.1)


async def _refused(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> dict[str, str]:
    """Each topic the controller did not create (one that exists already is fine), and why."""
    try:
        response = await admin.create_topics(topics)
    except TopicAlreadyExistsError:
        return {}
    refused = {}
    for topic, code, *message in response.topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            refused[topic] = f"{errors.for_code(code).__name__} {''.join(message)}".strip()
    return refused


async def _compare(admin: AIOKafkaAdminClient, bootstrap: str, topics: Topics,
                   partitions: int) -> list[Difference]:
    found = await _describe(admin, list(topics.specs()))
    return compare(topics.specs(), found, partitions, topics.replication_factor, bootstrap)


async def _compare_created(admin: AIOKafkaAdminClient, bootstrap: str, topics: Topics,
                           partitions: int) -> list[Difference]:
    """`_compare`, once no topic just created is still missing from the metadata of the
    broker asked: each broker learns of a new topic a moment apart, and the one a describe
    reaches may not know it yet (seen on a 3-broker cluster just started)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CREATE_PATIENCE_S
    while True:
        differences = await _compare(admin, bootstrap, topics, partitions)
        if not any(d.setting == "topic" for d in differences) or loop.time() > deadline:
            return differences
        await asyncio.sleep(0.2)


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, FoundTopic]:
    """Partitions, replicas and every config of the topics that exist among `names`."""
    layouts = {t["topic"]: t["partitions"] for t in await admin.describe_topics(names)
               if t["error_code"] == 0 and t["partitions"]}
    configs = await _topic_configs(admin, list(layouts))
    return {name: FoundTopic(name, len(parts), min(len(p["replicas"]) for p in parts),
                             configs[name]) for name, parts in layouts.items()}


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str],
                         dynamic_only: bool = False) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    found: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            found[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"]
                if not dynamic_only or entry["config_source"] == DYNAMIC_TOPIC_CONFIG}
    return found


async def _alter(admin: AIOKafkaAdminClient, topics: Topics,
                 changes: list[Difference]) -> None:
    """AlterConfigs replaces a topic's whole set of its own configs: send the ones it has
    with the changes made, so nothing set by hand is dropped by the way."""
    names = sorted({d.topic for d in changes})
    current = await _topic_configs(admin, names, dynamic_only=True)
    for name in names:
        configs = current[name] | {d.setting: d.value for d in changes if d.topic == name}
        (response,) = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs)])
        for resource in response.to_object()["resources"]:
            if resource["error_code"]:
                raise RuntimeError(f"altering {name} failed: {resource['error_message']}")
        log.info("topic %s now has %s", name, configs)


# How long the broker lets a transaction stay open before aborting it itself, which fences
# its producer (its commit then fails with ProducerFenced). An enforcer's alert transaction
# lasts milliseconds (10 to 20 ms at p50: bench/RESULTS.md), but one left open by a paused
# or killed instance holds back every read_committed reader of its partitions of
# budget.alerts and budget.alert_memory until it ends: until a new owner fences it, or,
# with no other instance (or none restarted), this timeout. Measured on the local broker (a
# transaction begun and left open, a plain record written after it, a read_committed
# reader timed until it read that record; two runs, load average 3 to 8): held 65.5 and
# 67.4 s at aiokafka's default of 60 s, 15.6 and 17.3 s at 15 s. The broker looks for
# expired transactions every 10 s (transaction.abort.timed.out.transaction.cleanup.
# interval.ms), so a hold is the timeout plus up to 10 s: 10 s held as long as 15 s in
# both runs (the same look freed both). 15 s leaves a legitimate transaction a thousand
# times its usual length on a loaded machine and more than a partition leader's move
# (about 3 s in the broker-loss test), and is above the default session timeout, so a
# paused owner is usually fenced by its partition's new owner first. An owner aborted
# anyway takes its partition again (enforcer/group.py `fenced`): its alerts are sent,
# once. (The broker refuses a timeout above its transaction.max.timeout.ms, 15 min.)
TRANSACTION_TIMEOUT_MS = 15_000


def make_producer(bootstrap: str, linger_ms: int = 0,
                  security: KafkaSecurity | None = None,
                  transactional_id: str | None = None) -> AIOKafkaProducer:
    """An idempotent producer with acks=all: a retry never writes a message twice.

    No linger by default: the services send a batch's records in one burst without
    yielding, so they leave in one request anyway, and a linger only delayed each hop.

    With a `transactional_id`, its records are sent in transactions (the enforcer's alerts,
    one producer per owned partition: enforcer/fence.py). Starting it fences every earlier
    producer with the same id: their open transaction is aborted, and their commit fails
    with ProducerFenced. A transaction left open longer than TRANSACTION_TIMEOUT_MS is
    aborted by the broker. Readers never see aborted records: they read read_committed
    (`make_consumer`, the notifier's subscriber)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **security_options(security),
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        compression_type=None,
        transactional_id=transactional_id,
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
    )


def make_consumer(
    bootstrap: str, group_id: str | None = None, fetch_max_wait_ms: int = 500,
    security: KafkaSecurity | None = None, session_timeout_ms: int = 10_000,
    assignors: tuple[type[AbstractPartitionAssignor], ...] = (RoundRobinPartitionAssignor,),
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the work is done.
    It reads read_committed: records of an aborted transaction (an enforcer's alerts,
    fenced off a partition it lost: enforcer/fence.py) are never seen, and its end offsets
    are the last stable ones (an open transaction holds them back until it ends).

    Without a group, callers assign partitions and seek themselves (caches). In a group,
    `session_timeout_ms` is how long a silent member keeps its partitions (heartbeats go
    three times as often), and `assignors` how the group shares them out.
    A fetch is a long poll: the broker answers as soon as a record arrives (fetch.min.bytes
    1), so `fetch_max_wait_ms` delays nothing; it only bounds how often an idle consumer
    asks again (at 5 ms, every idle consumer sent 200 fetches a second).
    """
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **security_options(security),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        isolation_level="read_committed",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=session_timeout_ms // 3,
        partition_assignment_strategy=assignors,
    )


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(100):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"topic {topic!r} does not exist on the broker")


async def end_offsets(
    consumer: AIOKafkaConsumer, parts: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    result: dict[TopicPartition, int] = await consumer.end_offsets(list(parts))
    return result


async def batches(
    consumer: AIOKafkaConsumer, max_records: int = 10_000, timeout_ms: int = 50
) -> AsyncIterator[list[Record]]:
    """Yield non-empty batches across all assigned partitions, forever."""
    while True:
        batch = await fetch(consumer, max_records, timeout_ms)
        if batch:
            yield batch


async def fetch(consumer: AIOKafkaConsumer, max_records: int, timeout_ms: int) -> list[Record]:
    """One getmany across all assigned partitions, possibly empty."""
    fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
            for messages in fetched.values() for m in messages]


class CatchUp:
    """Where a reader has seen everything written before a moment: the end offsets of its
    partitions, taken once at that moment. Read a topic "up to its end" against these, not
    the current ends, or a busy topic never lets the reader be done."""

    def __init__(self, ends: dict[TopicPartition, int]) -> None:
        self.ends = ends

    @classmethod
    async def taken(cls, consumer: AIOKafkaConsumer, parts: Iterable[TopicPartition]) -> CatchUp:
        return cls(await end_offsets(consumer, parts))

    def by_key(self) -> dict[tuple[str, int], int]:
        """The ends keyed by (topic, partition), as stored offsets are."""
        return {(tp.topic, tp.partition): end for tp, end in self.ends.items()}

    async def behind(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """The partitions whose position is still short of its end."""
        return [tp for tp, end in self.ends.items() if await consumer.position(tp) < end]

    async def reached(self, consumer: AIOKafkaConsumer) -> bool:
        return not await self.behind(consumer)


def next_offsets(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """Per (topic, partition), the offset after the last record: what to commit or store
    after `records`, where a restart resumes."""
    offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        offsets[key] = max(offsets.get(key, 0), r.offset + 1)
    return offsets


def commit_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """`next_offsets` as a consumer group's commit takes them."""
    return {TopicPartition(topic, partition): offset
            for (topic, partition), offset in next_offsets(records).items()}


async def read_to_end(bootstrap: str, topic: str, last: int | None = None) -> list[Record]:
    """Every record of a topic from the beginning (or only the `last` records of each
    partition) up to its end offsets at call time."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        catch_up = await CatchUp.taken(consumer, parts)
        if last is not None:
            for tp, end in catch_up.ends.items():
                consumer.seek(tp, max(await consumer.position(tp), end - last))
        found: list[Record] = []
        while not await catch_up.reached(consumer):
            found.extend(await fetch(consumer, 10_000, 100))
        return found
    finally:
        await consumer.stop()
