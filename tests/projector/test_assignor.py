"""The projectors' partition placement (assignor.py), without Kafka: members' claims in,
each member's partitions out."""

from __future__ import annotations

from tally.services.projector.assignor import (
    NAME,
    Claim,
    dlq_follows,
    offered,
    place,
    refused,
    warm_assignor,
)
from tally.topics import Topics

SIX = list(range(6))


def active(owned: set[int] | None = None, at: dict[int, int] | None = None) -> Claim:
    return Claim(False, frozenset(owned or ()), at or {})


def standby(owned: set[int] | None = None, at: dict[int, int] | None = None) -> Claim:
    return Claim(True, frozenset(owned or ()), at or {})


def everywhere(offset: int) -> dict[int, int]:
    return dict.fromkeys(SIX, offset)


def test_fresh_actives_share_evenly_and_a_fresh_standby_gets_nothing() -> None:
    placed = place(SIX, {"a": active(), "b": active(), "s": standby()})
    assert sorted(map(len, (placed["a"], placed["b"]))) == [3, 3]
    assert placed["s"] == set() and placed["a"] | placed["b"] == set(SIX)


def test_owners_keep_their_partitions() -> None:
    claims = {"a": active({0, 2, 5}), "b": active({1, 3, 4})}
    assert place(SIX, claims) == {"a": {0, 2, 5}, "b": {1, 3, 4}}


def test_a_dead_actives_partitions_go_to_the_standby_that_follows_them() -> None:
    claims = {"b": active({1, 3, 5}, {1: 50, 3: 50, 5: 50}),
              "s": standby(set(), everywhere(48))}
    assert place(SIX, claims) == {"b": {1, 3, 5}, "s": {0, 2, 4}}


def test_the_only_standby_takes_everything() -> None:
    assert place(SIX, {"s": standby(set(), everywhere(9))}) == {"s": set(SIX)}


def test_without_a_standby_an_orphan_goes_to_whoever_holds_it_furthest() -> None:
    claims = {"a": active({0}, {0: 10, 3: 7}), "b": active({1}, {1: 10}),
              "c": active({2}, {2: 10})}
    placed = place(SIX, claims)
    assert 3 in placed["a"] and all(len(ps) == 2 for ps in placed.values())


def test_a_restarted_active_takes_back_from_the_standby_what_its_file_holds() -> None:
    claims = {"a": active(set(), {0: 40, 2: 40, 4: 40}),
              "b": active({1, 3, 5}, everywhere(50)),
              "s": standby({0, 2, 4}, everywhere(50))}
    assert place(SIX, claims) == {"a": {0, 2, 4}, "b": {1, 3, 5}, "s": set()}


def test_a_standby_owning_partitions_keeps_them_while_no_active_is_new() -> None:
    claims = {"b": active({1, 3, 5}), "s": standby({0, 2, 4}, everywhere(50))}
    assert place(SIX, claims) == {"b": {1, 3, 5}, "s": {0, 2, 4}}


def test_a_new_active_beside_a_standby_that_took_everything_gets_all_back() -> None:
    claims = {"a": active(), "s": standby(set(SIX), everywhere(50))}
    assert place(SIX, claims) == {"a": set(SIX), "s": set()}


def test_a_new_active_is_balanced_in_with_the_partitions_its_file_holds() -> None:
    claims = {"a": active(set(), {4: 30, 5: 30, 0: 1}), "b": active(set(SIX), everywhere(60))}
    placed = place(SIX, claims)
    assert placed["a"] == {0, 4, 5} and placed["b"] == {1, 2, 3}


def test_a_partition_claimed_twice_stays_with_the_file_further_in_it() -> None:
    zombie = active({0, 2, 4}, {0: 20, 2: 20, 4: 20})
    claims = {"b": active(set(SIX), everywhere(90)), "z": zombie}
    placed = place(SIX, claims)
    assert placed["b"] | placed["z"] == set(SIX) and not placed["b"] & placed["z"]
    assert len(placed["z"]) == 3 and len(placed["b"]) == 3  # balanced, each once


def test_a_claim_round_trips_and_unreadable_user_data_is_an_empty_active() -> None:
    claim = standby({1, 2}, {1: 5, 2: 7})
    assert Claim.decode(claim.encode()) == claim
    assert Claim.decode(b"") == active() and Claim.decode(b"\x00junk") == active()


def test_the_dlq_partitions_go_with_the_events_partitions() -> None:
    assert dlq_follows({"a": {0, 2}, "b": {1}}, 3, [0, 1, 2]) == {"a": {0, 2}, "b": {1}}


def test_a_standby_offers_the_warm_assignor_alone_an_active_one_round_robin_after_it() -> None:
    warm = warm_assignor(Topics("t"), Claim)
    assert [a.name for a in offered(warm, standby=False)] == [NAME, "roundrobin"]
    assert [a.name for a in offered(warm, standby=True)] == [NAME]


def test_a_refused_standby_is_told_the_cause_and_the_fix() -> None:
    said = str(refused("tally-projector:usage.events", standby=True))
    assert "tally-projector:usage.events" in said and "only round-robin" in said
    assert said.endswith("then start the standby")
    assert "no partition assignor in common" in str(refused("g", standby=False))
