"""Infrastructure settings from the environment: the only place that reads it.

Budget rules never come from here (they live in config/*.yaml); only where things run.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tally.topics import Topics

__all__ = ["Settings", "project_root"]


def project_root() -> Path:
    """The checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


class Settings(BaseModel):
    """Where Kafka is, where data lives, which ports the services listen on (and the
    caller's credential, for a command that asks a service)."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    data_dir: Path = project_root() / "data"
    config_dir: Path = project_root() / "config"
    topic_namespace: str = ""  # prefixes every topic name: isolated demos and tests
    partitions: int = 3
    ingest_port: int = 8081
    projector_port: int = 8082
    enforcer_port: int = 8083
    # The caller's own credential, for commands that ask a service (tally audit).
    api_key: str | None = None
    token: str | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_namespace)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        fields = {
            "bootstrap_servers": env.get("KAFKA_BOOTSTRAP_SERVERS"),
            "data_dir": env.get("TALLY_DATA_DIR"),
            "config_dir": env.get("TALLY_CONFIG_DIR"),
            "topic_namespace": env.get("TALLY_TOPIC_NAMESPACE"),
            "partitions": env.get("TALLY_PARTITIONS"),
            "ingest_port": env.get("TALLY_INGEST_PORT"),
            "projector_port": env.get("TALLY_PROJECTOR_PORT"),
            "enforcer_port": env.get("TALLY_ENFORCER_PORT"),
            "api_key": env.get("TALLY_API_KEY") or None,
            "token": env.get("TALLY_TOKEN") or None,
        }
        return cls.model_validate({k: v for k, v in fields.items() if v is not None})
