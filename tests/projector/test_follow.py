"""Projector.follow (a changed config, taken while it runs) keeps its decoder unless the
events decode otherwise. A bulk restore under way (restore.py) stops at a new decoder, its
batches decoded under the old, and leaves the rest to the live fold, about 40 times as
slow: a changed limit (or users.yaml) must not replace it; a changed counting must."""

from __future__ import annotations

from pathlib import Path

from aiokafka import AIOKafkaProducer

from tally.config.loader import load_config
from tally.services.projector import store
from tally.services.projector.app import Projector
from tally.topics import Topics
from tests.projector.test_projector_kafka import BUDGETS
from tests.projector.test_restore_handback_kafka import CHANGED


async def test_a_changed_limit_keeps_the_decoder_and_a_changed_counting_replaces_it(
    config_dir: Path, tmp_path: Path
) -> None:
    config = load_config(config_dir)
    budgets = config.budgets.per_user_budgets
    with store.connect(tmp_path / "p.duckdb", schedule=budgets.reset_schedule,
                       counted=budgets.counted_tokens) as con:
        # Its producer is never started: no balance to send (the store is empty).
        projector = Projector(con, config, Topics("follow"),
                              AIOKafkaProducer(bootstrap_servers="127.0.0.1:9"))
        decoder = projector.decoder
        limit = BUDGETS.replace("daily_tokens: 1000", "daily_tokens: 2000")
        assert limit != BUDGETS
        (config_dir / "budgets.yaml").write_text(limit)
        await projector.follow(load_config(config_dir))
        assert projector.decoder is decoder
        (config_dir / "budgets.yaml").write_text(CHANGED)
        await projector.follow(load_config(config_dir))
        assert projector.decoder is not decoder
        assert "cache_read_tokens" in projector.decoder.counted
