"""Fixtures every Kafka test uses: one real broker per session, and unique names per test.

Where the broker comes from, first match wins:
1. KAFKA_BOOTSTRAP_SERVERS, when set (a broker someone else runs);
2. an apache/kafka container through testcontainers, when a Docker engine answers;
3. the project's own local broker (tally_dev.localkafka) on 127.0.0.1:19092, data in
   .local/kafka-test, so a developer's broker on 9092 is left alone. Several pytest sessions
   may share it at once (each holds a lease in .local/kafka-test.sessions); the last session
   out stops it, and only if a session started it.
Nothing is skipped: when no broker can be had, the fixture fails with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tally_dev import localkafka
from tests.paths import project_root

# TALLY_TEST_KAFKA_PORT moves the test broker, e.g. for a second checkout beside this one.
TEST_PORT = int(os.environ.get("TALLY_TEST_KAFKA_PORT", "19092"))
TEST_CONTROLLER_PORT = TEST_PORT + 1
TEST_DATA_DIR = project_root() / ".local" / "kafka-test"
LEASES = project_root() / ".local" / "kafka-test.sessions"
KAFKA_IMAGE = os.environ.get("TALLY_KAFKA_IMAGE", "apache/kafka:4.3.1")  # = src/tally_dev/pom.xml


def docker_answers() -> bool:
    """A quick ping of the Docker engine; False fast when there is none."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def container_env(host: str, host_port: int) -> dict[str, str]:
    """apache/kafka settings for one KRaft node advertised on the host's mapped port."""
    return {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{host}:{host_port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": "3",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }


def kafka_container() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer

    host_port = free_port()
    container: Any = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, host_port)
    try:
        host = container.get_container_host_ip()
    except Exception:  # modes that need a started container; the usual answer
        host = "localhost"
    for key, value in container_env(host, host_port).items():
        container = container.with_env(key, value)
    with container:
        bootstrap = f"{host}:{host_port}"
        localkafka.wait_ready(bootstrap, timeout=120.0)
        yield bootstrap


@contextlib.contextmanager
def leases_locked() -> Iterator[Path]:
    """The directory of sessions using the test broker, locked (sessions may run at once)."""
    LEASES.mkdir(parents=True, exist_ok=True)
    with (LEASES / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield LEASES


def live_leases(leases: Path) -> list[Path]:
    """Leases of pytest sessions still alive; those of dead sessions are dropped."""
    live = []
    for lease in leases.glob("[0-9]*"):
        if localkafka.process_exists(int(lease.name)):
            live.append(lease)
        else:
            lease.unlink(missing_ok=True)
    return live


def local_broker() -> Iterator[str]:
    """The test broker, shared by concurrent sessions; the last one out stops it if a
    session started it (a broker someone started by hand is left running). A session that
    starts it starts it empty (`localkafka.clear`): every test makes topics of its own
    namespace, and kept from run to run they slowed the broker's start past the 90 s it is
    given (12,107 partition directories, 681 MB, in a checkout tested for weeks)."""
    own_lease = LEASES / str(os.getpid())
    with leases_locked() as leases:
        if not live_leases(leases) and localkafka.clear(TEST_DATA_DIR):
            (leases / "owned").touch()
        own_lease.touch()
        bootstrap = localkafka.start(TEST_PORT, TEST_CONTROLLER_PORT, TEST_DATA_DIR)
    try:
        yield bootstrap
    finally:
        with leases_locked() as leases:
            own_lease.unlink(missing_ok=True)
            if not live_leases(leases) and (leases / "owned").exists():
                localkafka.stop(TEST_DATA_DIR)
                (leases / "owned").unlink()


@pytest.fixture(scope="session")
def local_broker_args() -> dict[str, Any]:
    """The arguments of localkafka.start() for the tests' own broker."""
    return {
        "port": TEST_PORT,
        "controller_port": TEST_CONTROLLER_PORT,
        "data_dir": TEST_DATA_DIR,
    }


@pytest.fixture(scope="session")
def local_kafka() -> Iterator[str]:
    """The project's own test broker (tally_dev.localkafka), whatever kafka_bootstrap uses."""
    yield from local_broker()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """bootstrap_servers of a real Kafka 4 broker for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        localkafka.wait_ready(configured.split(",")[0], timeout=60.0)
        yield configured
    elif docker_answers():
        print(f"kafka_bootstrap: Docker container {KAFKA_IMAGE}", file=sys.stderr)
        yield from kafka_container()
    else:
        bootstrap: str = request.getfixturevalue("local_kafka")
        yield bootstrap


@pytest.fixture
def unique_name() -> str:
    """A short suffix so each test has its own topics and consumer groups."""
    return uuid.uuid4().hex[:8]


# The three-node cluster of the broker-loss test: ports TEST_PORT+10 (and +11..+15).
CLUSTER_PORT = TEST_PORT + 10
CLUSTER_DATA_DIR = project_root() / ".local" / "kafka-cluster-test"


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[tuple[str, list[localkafka.Node]]]:
    """A three-node KRaft cluster on loopback (tally_dev.localkafka), stopped at session end."""
    localkafka.clear(CLUSTER_DATA_DIR)
    bootstrap = localkafka.start_cluster(3, CLUSTER_PORT, CLUSTER_PORT + 1, CLUSTER_DATA_DIR)
    try:
        yield bootstrap, localkafka.cluster_nodes(3, CLUSTER_PORT, CLUSTER_PORT + 1,
                                                  CLUSTER_DATA_DIR)
    finally:
        localkafka.stop(CLUSTER_DATA_DIR)


# The SASL broker of tests/test_sasl.py: one SASL_PLAINTEXT SCRAM listener, on TEST_PORT+20.
SASL_PORT = TEST_PORT + 20
SASL_DATA_DIR = project_root() / ".local" / "kafka-sasl-test"
SASL_USER = localkafka.SaslUser("tally", "tally-secret")


@pytest.fixture(scope="session")
def kafka_sasl() -> Iterator[tuple[str, localkafka.SaslUser]]:
    """A broker that takes only SCRAM-authenticated clients, stopped at session end."""
    localkafka.clear(SASL_DATA_DIR)
    bootstrap = localkafka.start(SASL_PORT, SASL_PORT + 1, SASL_DATA_DIR, sasl=SASL_USER)
    try:
        yield bootstrap, SASL_USER
    finally:
        localkafka.stop(SASL_DATA_DIR)


# The TLS broker of tests/test_tls.py: one SSL listener on TEST_PORT+30, its CA made in its
# data dir by `tally kafka start --tls`.
TLS_PORT = TEST_PORT + 30
TLS_DATA_DIR = project_root() / ".local" / "kafka-tls-test"


@pytest.fixture(scope="session")
def kafka_tls() -> Iterator[tuple[str, Path]]:
    """A broker that speaks only TLS, and the CA file its clients trust; stopped at
    session end."""
    localkafka.clear(TLS_DATA_DIR)
    bootstrap = localkafka.start(TLS_PORT, TLS_PORT + 1, TLS_DATA_DIR, tls=True)
    try:
        yield bootstrap, TLS_DATA_DIR / "config" / "tls" / "ca.pem"
    finally:
        localkafka.stop(TLS_DATA_DIR)
