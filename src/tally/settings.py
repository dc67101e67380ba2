"""Infrastructure settings from the environment: the only place that reads it.

Budget rules never come from here (they live in config/*.yaml); only where things run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, model_validator

from tally.topics import Topics

__all__ = ["KafkaSecurity", "Settings", "project_root"]

SECURITY_ENV = {  # KafkaSecurity field -> the environment variable it comes from
    "protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_username": "KAFKA_SASL_USERNAME",
    "sasl_password": "KAFKA_SASL_PASSWORD",
    "ssl_ca_file": "KAFKA_SSL_CA_FILE",
    "ssl_cert_file": "KAFKA_SSL_CERT_FILE",
    "ssl_key_file": "KAFKA_SSL_KEY_FILE",
    "ssl_key_password": "KAFKA_SSL_KEY_PASSWORD",
}


def project_root() -> Path:
    """The checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


class KafkaSecurity(BaseModel):
    """How every Kafka client authenticates and encrypts: SASL (PLAIN, SCRAM-SHA-256/512)
    and TLS (a CA file, optionally a client certificate and key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    ssl_key_password: str | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.protocol} needs "
                             "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("a client certificate needs both KAFKA_SSL_CERT_FILE and "
                             "KAFKA_SSL_KEY_FILE")
        for name, path in (("KAFKA_SSL_CA_FILE", self.ssl_ca_file),
                           ("KAFKA_SSL_CERT_FILE", self.ssl_cert_file),
                           ("KAFKA_SSL_KEY_FILE", self.ssl_key_file)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KafkaSecurity:
        env = dict(os.environ) if env is None else env
        fields = {name: env.get(var) for name, var in SECURITY_ENV.items()}
        return cls.model_validate({k: v for k, v in fields.items() if v})


class Settings(BaseModel):
    """Where Kafka is, where data lives, which ports the services listen on (and the
    caller's credential, for a command that asks a service)."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    data_dir: Path = project_root() / "data"
    config_dir: Path = project_root() / "config"
    topic_namespace: str = ""  # prefixes every topic name: isolated demos and tests
    partitions: int = 3
    replication_factor: int | None = None  # None: the broker's default.replication.factor
    ingest_port: int = 8081
    projector_port: int = 8082
    enforcer_port: int = 8083
    # The caller's own credential, for commands that ask a service (tally audit).
    api_key: str | None = None
    token: str | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_namespace, self.replication_factor)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        fields = {
            "bootstrap_servers": env.get("KAFKA_BOOTSTRAP_SERVERS"),
            "data_dir": env.get("TALLY_DATA_DIR"),
            "config_dir": env.get("TALLY_CONFIG_DIR"),
            "topic_namespace": env.get("TALLY_TOPIC_NAMESPACE"),
            "partitions": env.get("TALLY_PARTITIONS"),
            "replication_factor": env.get("TALLY_REPLICATION_FACTOR"),
            "ingest_port": env.get("TALLY_INGEST_PORT"),
            "projector_port": env.get("TALLY_PROJECTOR_PORT"),
            "enforcer_port": env.get("TALLY_ENFORCER_PORT"),
            "api_key": env.get("TALLY_API_KEY") or None,
            "token": env.get("TALLY_TOKEN") or None,
        }
        return cls.model_validate({k: v for k, v in fields.items() if v is not None})
