"""A single-node Apache Kafka broker (KRaft, broker+controller) that the project runs itself.

No Docker: the broker jars come from Maven Central through pom.xml (beside this file, in
the package), and the broker is
`java -cp '.local/kafka/libs/*' kafka.Kafka server.properties`, started detached so it
outlives the caller. `tally kafka start|stop|status` is `main()` below; the tests reach it
through the `kafka_bootstrap` fixture in tests/conftest.py.

Layout: the jars are shared in ./.local/kafka/libs; each data dir (default ./.local/kafka,
both in the working directory) holds config/, data/ (log.dirs), logs/kafka.log and
kafka.pid.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tally.cli import command_main
from tally.errors import ClusterError
from tally.topics import min_insync_replicas
from tally_dev.localtls import TlsFiles, client_context, ensure_tls_files

__all__ = [
    "KafkaStartError",
    "Node",
    "SaslUser",
    "cluster_nodes",
    "ensure_jars",
    "is_running",
    "kill_node",
    "main",
    "probe",
    "render_server_properties",
    "restart_node",
    "running_pid",
    "start",
    "start_cluster",
    "stop",
    "wait_ready",
]

HOST = "127.0.0.1"
RETENTION_CHECK_MS = 1000
SERVER_MAIN = "kafka.Kafka"
STORAGE_MAIN = "kafka.tools.StorageTool"
BROKER_JVM = ["-Xmx512m", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
TOOL_JVM = ["-Xmx256m", "-XX:TieredStopAtLevel=1"]
COMMON_JVM = ["-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = INFO
"""


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # brokers this process spawned


class KafkaStartError(ClusterError):
    """The broker could not be started (or did not answer in time)."""


@dataclass(frozen=True)
class Layout:
    """Where one broker keeps its config, data, log and pid file."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config" / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.root / "config" / "log4j2.properties"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "kafka.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "kafka.pid"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.root / "config" / "tls")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_data_dir() -> Path:
    """`.local/kafka` in the working directory (absolute: the broker runs in its own)."""
    return Path.cwd() / ".local" / "kafka"


def libs_dir() -> Path:
    return default_data_dir() / "libs"


def pom_file() -> Path:
    """The Maven file naming the broker's jars, shipped in this package."""
    return Path(__file__).with_name("pom.xml")


# ---------------------------------------------------------------- pure helpers


SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class SaslUser:
    """The one SCRAM user of a local SASL broker (clients and the broker itself)."""

    username: str
    password: str

    def server_settings(self, listener: str) -> dict[str, str]:
        login = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
                 f'username="{self.username}" password="{self.password}";')
        return {"sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
                "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISMS[0]} | {
            f"listener.name.{listener.lower()}.{m.lower()}.sasl.jaas.config": login
            for m in SCRAM_MECHANISMS}

    def format_args(self) -> list[str]:
        """StorageTool arguments that create the user's SCRAM credentials."""
        return [arg for m in SCRAM_MECHANISMS for arg in
                ("--add-scram", f"{m}=[name={self.username},password={self.password}]")]



def render_server_properties(port: int, controller_port: int, log_dirs: Path,
                             node_id: int = 1, voters: str | None = None,
                             sasl: SaslUser | None = None, tls: TlsFiles | None = None,
                             ) -> str:
    """server.properties for one combined broker+controller on 127.0.0.1: node.id 1 alone,
    or one node of a cluster whose controller quorum is `voters` ("1@host:port,...").
    With `sasl`, clients (and the broker itself) sign in with SCRAM on a SASL_PLAINTEXT
    listener; the credentials are created when the storage is formatted. With `tls`, the
    listener is encrypted (SSL, or SASL_SSL with both) with the certificate in its files."""
    voters = voters or f"{node_id}@{HOST}:{controller_port}"
    replicas = voters.count("@")
    listener = listener_protocol(sasl is not None, tls is not None)
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": f"{listener}://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"{listener}://{HOST}:{port}",
        "inter.broker.listener.name": listener,
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{listener}:{listener}",
        "log.dirs": str(log_dirs),
        "num.partitions": "3",
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(min_insync_replicas(replicas)),
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_insync_replicas(replicas)),
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(min_insync_replicas(replicas)),
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        # Retention is enforced within seconds rather than 5 minutes, so that a test can
        # let "a week" pass (topics with retention.ms of seconds). Cheap on a dev broker.
        "log.retention.check.interval.ms": str(RETENTION_CHECK_MS),
    }
    if sasl is not None:
        settings |= sasl.server_settings(listener)
    if tls is not None:  # the broker's own connections to itself trust the same CA
        settings |= {"ssl.keystore.type": "PEM", "ssl.keystore.location": str(tls.keystore),
                     "ssl.truststore.type": "PEM", "ssl.truststore.location": str(tls.ca),
                     "ssl.client.auth": "none"}
    if replicas > 1:  # a killed node is fenced, and its partitions led elsewhere, in ~3 s
        settings |= {"broker.session.timeout.ms": "3000", "broker.heartbeat.interval.ms": "500"}
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def listener_protocol(sasl: bool, tls: bool) -> str:
    return ("SASL_" if sasl else "") + ("SSL" if tls else "PLAINTEXT")


def configured_port(properties: str) -> int | None:
    """The client port in a rendered server.properties, or None."""
    match = re.search(r"^advertised\.listeners=[A-Z_]+://[^:]+:(\d+)$", properties, re.M)
    return int(match.group(1)) if match else None


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 chars)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def java_command(java: str, main_class: str, jvm: list[str], args: list[str]) -> list[str]:
    classpath = str(libs_dir() / "*")
    return [java, *jvm, *COMMON_JVM, "-cp", classpath, main_class, *args]


def metadata_request(correlation_id: int) -> bytes:
    """A framed Metadata v4 request for no topics (just the brokers)."""
    client_id = b"tally-localkafka"
    header = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">ib", 0, 0)  # topics: empty array; allow_auto_topic_creation: false
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def brokers_in_metadata_response(payload: bytes, correlation_id: int) -> int:
    """How many brokers a Metadata v4 response lists (0 if it is not our answer)."""
    if len(payload) < 12:
        return 0
    answered_id, _throttle_ms, brokers = struct.unpack(">iii", payload[:12])
    return brokers if answered_id == correlation_id else 0


# ------------------------------------------------------------------- probing


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks += chunk
    return bytes(chunks)


def probe(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a Kafka broker answers a Metadata request listing at least one broker."""
    return broker_count(host, port, timeout) > 0


def answers_api_versions(host: str, port: int, timeout: float = 2.0,
                         tls: ssl.SSLContext | None = None) -> bool:
    """True when a broker answers ApiVersions: the one request a SASL listener takes before
    the client signs in (a Metadata request there is answered by closing the connection);
    over TLS when given the context to connect with."""
    correlation_id = int(time.monotonic_ns() % 2**31)
    client_id = b"tally-localkafka"
    payload = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if tls is not None:
                sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=host))
            sock.sendall(struct.pack(">i", len(payload)) + payload)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            answer = _recv_exact(sock, size)
    except (OSError, struct.error):
        return False
    return len(answer) >= 4 and struct.unpack(">i", answer[:4])[0] == correlation_id


def broker_count(host: str, port: int, timeout: float = 2.0) -> int:
    """How many live brokers the broker at host:port knows of (0: no answer)."""
    correlation_id = int(time.monotonic_ns() % 2**31)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(metadata_request(correlation_id))
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            payload = _recv_exact(sock, size)
    except (OSError, struct.error):
        return 0
    return brokers_in_metadata_response(payload, correlation_id)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def wait_ready(bootstrap: str, timeout: float = 60.0) -> None:
    """Wait until the broker at host:port answers; raise KafkaStartError after timeout."""
    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout
    while not probe(host, int(port)):
        if time.monotonic() > deadline:
            raise KafkaStartError(f"Kafka at {bootstrap} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


# ---------------------------------------------------------------------- jars


def _pom_digest() -> str:
    return hashlib.sha256(pom_file().read_bytes()).hexdigest()


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaStartError(f"`{name}` is not on PATH: {hint}")
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return _tool("java", "Kafka 4 needs Java 17 or newer")


def ensure_jars() -> Path:
    """The broker's jar directory, fetched with Maven when missing or when the pom changed."""
    libs = libs_dir()
    stamp = libs / ".pom-sha256"
    digest = _pom_digest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return libs
    say("resolving Kafka jars with Maven...")
    staging = libs.with_name(f"libs.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    _copy_dependencies(staging)
    (staging / ".pom-sha256").write_text(digest + "\n")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    return libs


def _copy_dependencies(target: Path) -> None:
    mvn = _tool("mvn", "install Maven 3.8+ (apt-get install maven)")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as build:  # Maven's files, not in site-packages
        pom = Path(shutil.copy(pom_file(), build))
        command = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                   f"-DoutputDirectory={target}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(target.glob("kafka_2.13-*.jar")):
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise KafkaStartError(f"Maven could not fetch the Kafka jars:\n{output}")


# ------------------------------------------------------------- process state


def _read_pid(layout: Layout) -> int | None:
    try:
        return int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Is pid running? Reaps it when it is our exited child (zombies count as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    with contextlib.suppress(ChildProcessError):
        reaped, _status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    return process_exists(pid)


def process_exists(pid: int) -> bool:
    """Is there a process `pid` (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_broker(pid: int, layout: Layout) -> bool:
    """The pid is alive and runs kafka.Kafka with this data dir's config (not a reused pid)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file
    if not cmdline:
        return True  # mid-exec (just spawned): nothing to compare yet
    words = cmdline.split(b"\0")
    return str(layout.config_file).encode() in words and SERVER_MAIN.encode() in words


def _running_pid(layout: Layout) -> int | None:
    """The broker's pid when it runs; a stale pid file is removed."""
    pid = _read_pid(layout)
    if pid is not None and _is_our_broker(pid, layout):
        return pid
    layout.pid_file.unlink(missing_ok=True)
    return None


def rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """One start/stop at a time per data dir (tests and CLI may race)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _layout(data_dir: Path | None) -> Layout:
    return Layout((data_dir or default_data_dir()).resolve())


def running_pid(data_dir: Path | None = None) -> int | None:
    """The pid of the broker of this data dir (default .local/kafka), or None."""
    return _running_pid(_layout(data_dir))


def is_running(data_dir: Path | None = None) -> bool:
    """True when the broker of this data dir (default .local/kafka) is alive."""
    return running_pid(data_dir) is not None


# --------------------------------------------------------------------- start


def _write_config(layout: Layout, properties: str) -> None:
    layout.config_file.parent.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(properties)
    layout.log4j_file.write_text(LOG4J2)


def _log4j_flag(layout: Layout) -> str:
    return f"-Dlog4j2.configurationFile={layout.log4j_file}"


def _format_storage(layout: Layout, java: str, cluster_id: str,
                    sasl: SaslUser | None = None) -> None:
    """Format log.dirs once, with the cluster's id (static quorum of controller voters)."""
    if (layout.data / "meta.properties").exists():
        return
    say(f"formatting storage of {layout.root}...")
    shutil.rmtree(layout.data, ignore_errors=True)  # unformatted leftovers are never valid
    args = ["format", "-t", cluster_id, "-c", str(layout.config_file)]
    args += sasl.format_args() if sasl else []
    jvm = [*TOOL_JVM, _log4j_flag(layout)]
    command = java_command(java, STORAGE_MAIN, jvm, args)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise KafkaStartError(f"formatting {layout.data} failed:\n{output}")
    (layout.root / "cluster-id").write_text(cluster_id + "\n")


def _rotate_log(layout: Layout) -> None:
    layout.log_file.parent.mkdir(parents=True, exist_ok=True)
    if layout.log_file.exists():
        layout.log_file.replace(layout.log_file.with_suffix(".log.1"))


def _spawn(layout: Layout, java: str, heap: list[str] = BROKER_JVM) -> int:
    _rotate_log(layout)
    jvm = [*heap, _log4j_flag(layout), f"-Dkafka.logs.dir={layout.log_file.parent}"]
    command = java_command(java, SERVER_MAIN, jvm, [str(layout.config_file)])
    with layout.log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=layout.root,
            start_new_session=True,
        )
    _CHILDREN[process.pid] = process
    layout.pid_file.write_text(f"{process.pid}\n")
    return process.pid


def _log_tail(layout: Layout, lines: int = 15) -> str:
    try:
        text = layout.log_file.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _failure(layout: Layout, what: str) -> KafkaStartError:
    tail = _log_tail(layout)
    return KafkaStartError(f"{what}; see {layout.log_file}\n--- last lines ---\n{tail}")


def _await_broker(layout: Layout, pid: int, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(layout, port):
        if not _alive(pid):
            layout.pid_file.unlink(missing_ok=True)
            raise _failure(layout, f"Kafka (pid {pid}) exited during startup")
        if time.monotonic() > deadline:
            raise _failure(layout, f"Kafka did not answer on {HOST}:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def _answers(layout: Layout, port: int) -> bool:
    """Whether the broker answers on its listener, however that listener is secured."""
    properties = layout.config_file.read_text()
    if "ssl.keystore.location" in properties:
        return answers_api_versions(HOST, port, tls=client_context(layout.tls.ca))
    if "SASL_" in properties:
        return answers_api_versions(HOST, port)
    return probe(HOST, port)


def _check_ports_free(port: int, controller_port: int) -> None:
    for candidate in (port, controller_port):
        if port_open(candidate):
            raise KafkaStartError(
                f"port {candidate} on {HOST} is already in use by another process "
                "(not a broker started from this data dir); stop it or pick other ports"
            )


def _reuse(layout: Layout, pid: int, port: int, timeout: float) -> str:
    running_port = configured_port(layout.config_file.read_text())
    if running_port != port:
        raise KafkaStartError(
            f"Kafka from {layout.root} already runs (pid {pid}) on port {running_port}, "
            f"not {port}; stop it first"
        )
    _await_broker(layout, pid, port, timeout)
    return f"{HOST}:{port}"


def start(
    port: int = 9092,
    controller_port: int = 9093,
    data_dir: Path | None = None,
    timeout: float = 90.0,
    sasl: SaslUser | None = None,
    tls: bool = False,
) -> str:
    """Start the broker (or find it running) and return its bootstrap "127.0.0.1:PORT".
    With `sasl`, its one listener is SASL_PLAINTEXT with SCRAM, for that user only (a data
    dir formatted without it has no such user: use another data dir). With `tls`, that
    listener is encrypted, with a certificate from a CA made in the data dir (clients
    trust `<data dir>/tls/ca.pem`)."""
    layout = _layout(data_dir)
    with _locked(layout):
        pid = _running_pid(layout)
        if pid is not None:
            return _reuse(layout, pid, port, timeout)
        _check_ports_free(port, controller_port)
        java = _java()
        ensure_jars()
        began = time.monotonic()
        certificates = ensure_tls_files(layout.tls.directory, HOST) if tls else None
        _write_config(layout, render_server_properties(port, controller_port, layout.data,
                                                       sasl=sasl, tls=certificates))
        _format_storage(layout, java, new_cluster_id(), sasl)
        pid = _spawn(layout, java)
        try:
            _await_broker(layout, pid, port, timeout)
        except BaseException:
            _terminate(layout, pid, timeout=10.0)
            raise
    say(f"Kafka ready on {HOST}:{port} in {time.monotonic() - began:.1f} s (pid {pid})")
    return f"{HOST}:{port}"


# ---------------------------------------------------------------------- stop


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def clear(data_dir: Path) -> bool:
    """Delete every topic of the stopped broker (or cluster) of this data dir: its log.dirs
    go, and the next start formats them empty. False, and nothing deleted, while it runs."""
    root = _layout(data_dir)
    with _locked(root):
        layouts = [root, *_node_layouts(root)]
        if any(_running_pid(layout) is not None for layout in layouts):
            return False
        for layout in layouts:
            shutil.rmtree(layout.data, ignore_errors=True)
    return True


def stop(data_dir: Path | None = None, timeout: float = 30.0) -> bool:
    """Stop the broker, or every node of the cluster, of this data dir (SIGTERM, then
    SIGKILL after timeout). True if one was running."""
    root = _layout(data_dir)
    with _locked(root):
        running = [(layout, pid) for layout in [root, *_node_layouts(root)]
                   if (pid := _running_pid(layout)) is not None]
        for _, pid in running:  # all at once: the last of a cluster has no quorum
            _signal(pid, signal.SIGTERM)
        for layout, pid in running:
            _terminate(layout, pid, timeout)
    return bool(running)


def _terminate(layout: Layout, pid: int, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL; forget the pid file."""
    _signal(pid, signal.SIGTERM)
    if not _wait_exit(pid, timeout):
        say(f"Kafka (pid {pid}) did not stop in {timeout:.0f} s; killing it")
        _signal(pid, signal.SIGKILL)
        _wait_exit(pid, 10.0)
    _CHILDREN.pop(pid, None)
    layout.pid_file.unlink(missing_ok=True)


# ------------------------------------------------------------------- cluster

CLUSTER_JVM = ["-Xmx320m", "-Xms64m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]


@dataclass(frozen=True)
class Node:
    """One node of a local cluster: broker and controller in one process."""

    node_id: int
    layout: Layout
    port: int
    controller_port: int


def cluster_nodes(brokers: int, port: int, controller_port: int,
                  data_dir: Path | None = None) -> list[Node]:
    """Node i (from 1) listens on port + 2(i-1) and controller_port + 2(i-1), and keeps its
    data in <data dir>/node-i: 9092/9093, 9094/9095, 9096/9097 by default."""
    root = _layout(data_dir).root
    return [Node(i, Layout(root / f"node-{i}"), port + 2 * (i - 1),
                 controller_port + 2 * (i - 1)) for i in range(1, brokers + 1)]


def _node_layouts(root: Layout) -> list[Layout]:
    return [Layout(path) for path in sorted(root.root.glob("node-*")) if path.is_dir()]


def _cluster_id(root: Layout) -> str:
    """One id for every node of the cluster, kept beside them."""
    path = root.root / "cluster-id"
    if not path.exists():
        path.write_text(new_cluster_id() + "\n")
    return path.read_text().strip()


def start_cluster(brokers: int = 3, port: int = 9092, controller_port: int = 9093,
                  data_dir: Path | None = None, timeout: float = 120.0) -> str:
    """Start a cluster of `brokers` nodes on loopback (or find it running) and return its
    bootstrap servers; replication factor and min.insync.replicas follow its size."""
    root, nodes = _layout(data_dir), cluster_nodes(brokers, port, controller_port, data_dir)
    voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes)
    with _locked(root):
        java = _java()
        ensure_jars()
        began, cluster_id = time.monotonic(), _cluster_id(root)
        for node in nodes:
            if _running_pid(node.layout) is None:
                _check_ports_free(node.port, node.controller_port)
                _write_config(node.layout, render_server_properties(
                    node.port, node.controller_port, node.layout.data, node.node_id, voters))
                _format_storage(node.layout, java, cluster_id)
                _spawn(node.layout, java, CLUSTER_JVM)
        _await_cluster(nodes, brokers, timeout)
    say(f"Kafka cluster of {brokers} ready in {time.monotonic() - began:.1f} s")
    return ",".join(f"{HOST}:{node.port}" for node in nodes)


def _await_cluster(nodes: list[Node], brokers: int, timeout: float) -> None:
    """Every node answers and knows all `brokers` (a quorum formed, none fenced)."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while broker_count(HOST, node.port) < brokers:
            pid = _read_pid(node.layout)
            if pid is None or not _alive(pid):
                raise _failure(node.layout, f"Kafka node {node.node_id} exited during startup")
            if time.monotonic() > deadline:
                raise _failure(node.layout, f"the cluster did not form within {timeout:.0f} s")
            time.sleep(0.2)


def kill_node(node: Node, signum: signal.Signals = signal.SIGKILL) -> int:
    """Signal one node (SIGKILL: a crash); its pid."""
    pid = _running_pid(node.layout)
    if pid is None:
        raise KafkaStartError(f"Kafka node {node.node_id} is not running")
    _signal(pid, signum)
    _wait_exit(pid, 30.0)
    _CHILDREN.pop(pid, None)
    return pid


def restart_node(node: Node, timeout: float = 60.0) -> None:
    """Start one stopped node again from its config and data; return once it answers."""
    with _locked(node.layout):
        pid = _spawn(node.layout, _java(), CLUSTER_JVM)
        _await_broker(node.layout, pid, node.port, timeout)


# ----------------------------------------------------------------------- CLI


def _status(root: Layout) -> int:
    """One line per broker (the single one, or each node of a cluster); 0 if all answer."""
    return max(_node_status(layout) for layout in (_node_layouts(root) or [root]))


def _node_status(layout: Layout) -> int:
    pid = _running_pid(layout)
    if pid is None:
        print(f"Kafka is not running (data dir {layout.root})")
        return 1
    port = configured_port(layout.config_file.read_text()) or 0
    answering = probe(HOST, port)
    state = "ready" if answering else "not answering"
    rss = rss_mib(pid)
    memory = f", RSS {rss:.0f} MiB" if rss is not None else ""
    print(f"Kafka is running on {HOST}:{port} (pid {pid}, {state}{memory}); log {layout.log_file}")
    return 0 if answering else 1


def _sasl_user() -> SaslUser:
    return SaslUser(os.environ.get("KAFKA_SASL_USERNAME", "tally"),
                    os.environ.get("KAFKA_SASL_PASSWORD", "tally-secret"))


def _client_settings(layout: Layout, sasl: SaslUser | None, tls: bool) -> str:
    """The environment a client of this broker needs (the password left out)."""
    settings = [f"KAFKA_SECURITY_PROTOCOL={listener_protocol(sasl is not None, tls)}"]
    if sasl is not None:
        settings += ["KAFKA_SASL_MECHANISM=SCRAM-SHA-256",
                     f"KAFKA_SASL_USERNAME={sasl.username}", "KAFKA_SASL_PASSWORD=..."]
    if tls:
        settings.append(f"KAFKA_SSL_CA_FILE={layout.tls.ca.resolve()}")
    return " ".join(settings)


def run(args: argparse.Namespace) -> int:
    """`tally kafka start|stop|status` (options: tally.cli)."""
    data_dir: Path | None = args.data_dir
    if args.action == "status":
        return _status(_layout(data_dir))
    if args.action == "stop":
        print("Kafka stopped" if stop(data_dir) else "Kafka was not running")
        return 0
    # KafkaStartError is a ClusterError: the CLI says it in one line.
    if args.brokers > 1:
        print(start_cluster(args.brokers, args.port, args.controller_port, data_dir))
    else:
        sasl = _sasl_user() if args.sasl else None
        bootstrap = start(args.port, args.controller_port, data_dir, sasl=sasl, tls=args.tls)
        if sasl is not None or args.tls:
            say("clients: " + _client_settings(_layout(data_dir), sasl, args.tls))
        print(bootstrap)
    return 0


main = command_main("kafka")
