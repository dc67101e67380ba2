"""Which gained partitions are restored in bulk (restore.py), without Kafka."""

from __future__ import annotations

from tally.cli import parse
from tally.services.projector.restore import BULK_FROM, far_behind

TOPIC = "usage.events"


def test_a_partition_bulk_from_records_behind_or_more_is_restored_in_bulk() -> None:
    ends = {(TOPIC, 0): BULK_FROM, (TOPIC, 1): BULK_FROM + 10, (TOPIC, 2): 3 * BULK_FROM,
            ("other", 3): 10 * BULK_FROM}
    at = {0: 0, 1: 11, 2: BULK_FROM}
    assert far_behind(TOPIC, {0, 1, 2, 3}, at, ends) == {0, 2}


def test_a_partition_without_an_end_or_caught_up_is_left_to_the_live_fold() -> None:
    assert far_behind(TOPIC, {0, 1}, {1: 2 * BULK_FROM}, {(TOPIC, 1): 2 * BULK_FROM}) == set()


def test_the_bulk_threshold_is_an_option_of_the_projector() -> None:
    assert parse(["projector"]).bulk_from == BULK_FROM  # the default is the module's
    bulk_from = parse(["projector", "--bulk-from", "10000000"]).bulk_from
    ends = {(TOPIC, 0): 3 * BULK_FROM}
    assert far_behind(TOPIC, {0}, {}, ends, bulk_from) == set()  # all to the live fold
