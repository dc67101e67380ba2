"""Infrastructure settings from the environment: the only place that reads it.

Budget rules never come from here (they live in config/*.yaml); only where things run.
Each field names its environment variable once (`env(...)`); pydantic-settings reads them,
and an explicit mapping (`from_env(env)`) is read the same way, by the same names.
Relative paths (the defaults `config` and `data`) are relative to the working directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tally.topics import Topics

__all__ = ["KafkaSecurity", "Settings"]


def env(name: str, default: Any) -> Any:
    """A field read from the environment variable `name` (or given by its own name)."""
    return Field(default, validation_alias=AliasChoices(name, _field_name(name)))


def _field_name(variable: str) -> str:
    return variable.removeprefix("TALLY_").removeprefix("KAFKA_").lower()


class _FromEnv(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_ignore_empty=True,
                                      case_sensitive=True, populate_by_name=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """From the process environment, or from `environ` instead (by the same names)."""
        if environ is None:
            return cls()
        names = {choice for field in cls.model_fields.values()
                 for choice in getattr(field.validation_alias, "choices", ())}
        token = _ONLY_GIVEN.set(True)
        try:
            given: dict[str, Any] = {k: v for k, v in environ.items() if k in names and v}
            return cls(**given)
        finally:
            _ONLY_GIVEN.reset(token)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment only, no .env file; under `from_env(environ)`, not even that."""
        return (init_settings,) if _ONLY_GIVEN.get() else (init_settings, env_settings)


_ONLY_GIVEN: ContextVar[bool] = ContextVar("only_given", default=False)


class KafkaSecurity(_FromEnv):
    """How every Kafka client authenticates and encrypts: SASL (PLAIN, SCRAM-SHA-256/512)
    and TLS (a CA file, optionally a client certificate and key)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validation_alias=AliasChoices("KAFKA_SECURITY_PROTOCOL", "protocol"))
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = env(
        "KAFKA_SASL_MECHANISM", "PLAIN")
    sasl_username: str | None = env("KAFKA_SASL_USERNAME", None)
    sasl_password: str | None = env("KAFKA_SASL_PASSWORD", None)
    ssl_ca_file: Path | None = env("KAFKA_SSL_CA_FILE", None)
    ssl_cert_file: Path | None = env("KAFKA_SSL_CERT_FILE", None)
    ssl_key_file: Path | None = env("KAFKA_SSL_KEY_FILE", None)
    ssl_key_password: str | None = env("KAFKA_SSL_KEY_PASSWORD", None)

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


class Settings(_FromEnv):
    """Where Kafka is, where data lives, which ports the services listen on (and the
    caller's credential, for a command that asks a service)."""

    bootstrap_servers: str = env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    data_dir: Path = env("TALLY_DATA_DIR", Path("data"))
    config_dir: Path = env("TALLY_CONFIG_DIR", Path("config"))
    # Prefixes every topic name: isolated demos and tests.
    topic_namespace: str = env("TALLY_TOPIC_NAMESPACE", "")
    partitions: int = env("TALLY_PARTITIONS", 3)
    # None: the broker's default.replication.factor.
    replication_factor: int | None = env("TALLY_REPLICATION_FACTOR", None)
    ingest_port: int = env("TALLY_INGEST_PORT", 8081)
    projector_port: int = env("TALLY_PROJECTOR_PORT", 8082)
    enforcer_port: int = env("TALLY_ENFORCER_PORT", 8083)
    # The caller's own credential, for commands that ask a service (tally audit).
    api_key: str | None = env("TALLY_API_KEY", None)
    token: str | None = env("TALLY_TOKEN", None)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_namespace, self.replication_factor)
