"""Pure helpers of tally_dev.localkafka, and its handling of pid files (no broker needed)."""

from __future__ import annotations

import base64
import os
import socket
import struct
from pathlib import Path

from tally_dev import localkafka


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_server_properties_single_node_kraft_on_loopback(tmp_path: Path) -> None:
    config = properties(localkafka.render_server_properties(9092, 9093, tmp_path / "data"))
    assert config["process.roles"] == "broker,controller"
    assert config["node.id"] == "1"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert config["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert config["log.dirs"] == str(tmp_path / "data")
    assert config["offsets.topic.replication.factor"] == "1"
    assert config["transaction.state.log.replication.factor"] == "1"
    assert config["transaction.state.log.min.isr"] == "1"
    assert config["group.initial.rebalance.delay.ms"] == "0"
    assert config["num.partitions"] == "3"
    assert config["auto.create.topics.enable"] == "false"


def test_configured_port_reads_back_the_rendered_port(tmp_path: Path) -> None:
    text = localkafka.render_server_properties(19092, 19093, tmp_path)
    assert localkafka.configured_port(text) == 19092
    assert localkafka.configured_port("node.id=1\n") is None


def test_cluster_id_is_16_bytes_of_url_safe_base64() -> None:
    ids = {localkafka.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_metadata_request_is_a_framed_v4_request() -> None:
    frame = localkafka.metadata_request(42)
    (size,) = struct.unpack(">i", frame[:4])
    assert size == len(frame) - 4
    assert struct.unpack(">hhi", frame[4:12]) == (3, 4, 42)


def test_metadata_response_counts_brokers_of_our_request_only() -> None:
    answer = struct.pack(">iii", 42, 0, 1) + b"rest"
    assert localkafka.brokers_in_metadata_response(answer, 42) == 1
    assert localkafka.brokers_in_metadata_response(answer, 43) == 0
    assert localkafka.brokers_in_metadata_response(b"", 42) == 0


def test_probe_is_false_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not localkafka.probe("127.0.0.1", port, timeout=0.5)


def test_a_pid_file_of_another_process_is_stale_and_removed(tmp_path: Path) -> None:
    pid_file = tmp_path / "kafka.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a Kafka broker of this dir
    assert not localkafka.is_running(tmp_path)
    assert not pid_file.exists()


def test_stop_and_status_without_a_broker(tmp_path: Path) -> None:
    assert localkafka.stop(tmp_path) is False
    assert localkafka.main(["status", "--data-dir", str(tmp_path)]) == 1
    assert localkafka.main(["stop", "--data-dir", str(tmp_path)]) == 0


def test_a_cluster_node_replicates_three_ways_and_is_fenced_fast(tmp_path: Path) -> None:
    voters = "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
    config = properties(localkafka.render_server_properties(9094, 9095, tmp_path, 2, voters))
    assert (config["node.id"], config["controller.quorum.voters"]) == ("2", voters)
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:9094,CONTROLLER://127.0.0.1:9095"
    assert config["default.replication.factor"] == "3"
    assert config["min.insync.replicas"] == "2"
    assert config["offsets.topic.replication.factor"] == "3"
    assert config["broker.session.timeout.ms"] == "3000"
    nodes = localkafka.cluster_nodes(3, 9092, 9093, tmp_path)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 9092, 9093), (2, 9094, 9095), (3, 9096, 9097)]
    assert nodes[2].layout.root == tmp_path.resolve() / "node-3"


def test_a_sasl_broker_takes_only_scram_clients(tmp_path: Path) -> None:
    user = localkafka.SaslUser("tally", "pw")
    text = localkafka.render_server_properties(9192, 9193, tmp_path, sasl=user)
    config = properties(text)
    assert config["listeners"] == "SASL_PLAINTEXT://127.0.0.1:9192,CONTROLLER://127.0.0.1:9193"
    assert config["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    assert config["sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512"
    assert 'username="tally" password="pw";' in config[
        "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config"]
    assert localkafka.configured_port(text) == 9192
    assert user.format_args() == ["--add-scram", "SCRAM-SHA-256=[name=tally,password=pw]",
                                  "--add-scram", "SCRAM-SHA-512=[name=tally,password=pw]"]


def test_a_tls_broker_encrypts_its_one_listener_with_a_certificate_for_loopback(
        tmp_path: Path) -> None:
    from cryptography import x509

    from tally_dev.localtls import ensure_tls_files
    files = ensure_tls_files(tmp_path / "tls", "127.0.0.1")
    user = localkafka.SaslUser("tally", "pw")
    config = properties(localkafka.render_server_properties(9292, 9293, tmp_path, sasl=user,
                                                            tls=files))
    assert config["listeners"] == "SASL_SSL://127.0.0.1:9292,CONTROLLER://127.0.0.1:9293"
    assert config["ssl.keystore.location"] == str(files.keystore)
    assert "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config" in config
    chain = x509.load_pem_x509_certificates(files.keystore.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    assert chain[0].issuer == ca.subject and chain[1] == ca
    names = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    made = files.ca.read_bytes()
    assert ensure_tls_files(tmp_path / "tls", "127.0.0.1").ca.read_bytes() == made  # once


def test_clear_deletes_a_stopped_brokers_topics_and_keeps_its_config(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "node-1"):
        (root / "data" / "t-0").mkdir(parents=True)
        (root / "config").mkdir()
        (root / "config" / "server.properties").write_text("x=1\n")
    assert localkafka.clear(tmp_path) is True
    for root in (tmp_path, tmp_path / "node-1"):
        assert not (root / "data").exists()
        assert (root / "config" / "server.properties").read_text() == "x=1\n"


def test_clear_leaves_a_running_broker_alone(local_kafka: str) -> None:
    from tests.conftest import TEST_DATA_DIR

    assert localkafka.clear(TEST_DATA_DIR) is False
    assert (TEST_DATA_DIR / "data" / "meta.properties").exists()
