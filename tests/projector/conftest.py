"""Shared by the projector's Kafka tests: a config directory with their budgets and the
one admin who may audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.projector.test_projector_kafka import BUDGETS, USERS_YAML


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "budgets.yaml").write_text(BUDGETS)
    (directory / "users.yaml").write_text(USERS_YAML)
    return directory
