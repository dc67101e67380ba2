"""Which of two balances for a user stands: the one from the later position in its
usage.events partition, so a projector that lost the partition cannot go back in time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tally.wire import BalanceUpdated

AT = datetime(2026, 3, 1, tzinfo=UTC)


def balance(partition: int | None, offset: int | None) -> BalanceUpdated:
    return BalanceUpdated(user_id="ana", last_event_at=AT, as_of=AT,
                          source_partition=partition, source_offset=offset)


@pytest.mark.parametrize(("held", "incoming", "replaces"), [
    ((2, 100), (2, 101), True),    # later in the partition
    ((2, 100), (2, 100), True),    # a resend, or the same position recut
    ((2, 100), (2, 99), False),    # a zombie's older batch
    ((2, 100), (3, 5), True),      # another partition: no order between them
    ((None, None), (2, 1), True),  # written before instances existed
    ((2, 100), (None, None), True),
])
def test_a_balance_replaces_the_held_one_unless_older_in_its_partition(
        held: tuple[int | None, int | None], incoming: tuple[int | None, int | None],
        replaces: bool) -> None:
    assert balance(*held).superseded_by(balance(*incoming)) is replaces


def test_the_position_survives_the_wire() -> None:
    sent = balance(4, 12_345)
    back = BalanceUpdated.model_validate_json(sent.model_dump_json())
    assert (back.source_partition, back.source_offset) == (4, 12_345)


def test_a_negative_position_is_refused() -> None:
    with pytest.raises(ValueError, match="source_offset"):
        balance(1, -1)
