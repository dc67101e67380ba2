"""docker-compose.yml, without a Docker engine: valid by the Compose specification's JSON
Schema (as vendored by check-jsonschema), and in agreement with the topic table, the
services' ports and the Kafka version the tests run."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import jsonschema
import yaml

from tally.settings import Settings
from tally.topics import min_insync_replicas
from tests.paths import project_root

ROOT = project_root()


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema: dict[str, Any] = json.loads((vendored / "compose-spec.json").read_text())
    return schema


def brokers() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name.startswith("kafka-")}


def test_the_file_follows_the_compose_specification() -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert errors == []


def test_three_brokers_replicate_as_the_topic_table_wants() -> None:
    nodes = brokers()
    assert len(nodes) == 3
    for node in nodes.values():
        env = node["environment"]
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == len(nodes)
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == min_insync_replicas(len(nodes))
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == len(nodes)
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # only the table's topics
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == len(nodes)
    for name in ("ingest", "projector", "enforcer"):
        env = {k: str(v) for k, v in compose()["services"][name]["environment"].items()}
        settings = Settings.from_env(env)
        assert settings.replication_factor == len(nodes)
        assert len(settings.bootstrap_servers.split(",")) == len(nodes)


def test_the_kafka_image_is_the_version_the_tests_run() -> None:
    pom = (ROOT / "src" / "tally_dev" / "pom.xml").read_text()
    version = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert version is not None
    assert {node["image"] for node in brokers().values()} == {f"apache/kafka:{version[1]}"}


def test_every_service_port_is_published_and_bound_beyond_loopback() -> None:
    defaults = Settings()
    ports = {"ingest": defaults.ingest_port, "projector": defaults.projector_port,
             "enforcer": defaults.enforcer_port}
    for name, port in ports.items():
        service = compose()["services"][name]
        assert f"{port}:{port}" in service["ports"], name
        command = service["command"]
        assert command[command.index("--host") + 1] == "0.0.0.0", name
