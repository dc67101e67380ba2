"""Templates: known placeholders filled, everything else left as written."""

from __future__ import annotations

from tally.core.templates import PLACEHOLDERS, placeholders_in, render

VALUES = {
    "percent_used": 75,
    "period": "daily",
    "tokens_used": 750,
    "tokens_limit": 1000,
    "tokens_remaining": 250,
    "reset_time": "2026-05-11T00:00:00+00:00",
}


def test_every_placeholder_renders() -> None:
    template = " ".join(f"{{{name}}}" for name in sorted(PLACEHOLDERS))
    assert render(template, VALUES) == "75 daily 2026-05-11T00:00:00+00:00 1000 250 750"


def test_brief_footer() -> None:
    footer = "---\nYour usage: {tokens_used}/{tokens_limit} tokens ({percent_used}%)\n"
    assert render(footer, VALUES) == "---\nYour usage: 750/1000 tokens (75%)\n"


def test_unknown_placeholder_left_alone() -> None:
    assert render("{user} at {percent_used}%", VALUES) == "{user} at 75%"


def test_attribute_access_is_not_evaluated() -> None:
    assert render("{tokens_used.__class__}", VALUES) == "{tokens_used.__class__}"


def test_format_spec_is_not_evaluated() -> None:
    assert render("{tokens_used:>10}", VALUES) == "{tokens_used:>10}"


def test_missing_value_left_alone() -> None:
    assert render("{reset_time}", {}) == "{reset_time}"


def test_lone_braces_kept() -> None:
    assert render("{ } {{period}}", VALUES) == "{ } {daily}"


def test_placeholders_in() -> None:
    assert placeholders_in("a {period} b {bogus} {period}") == {"period", "bogus"}


def test_placeholder_names() -> None:
    assert {
        "percent_used",
        "period",
        "tokens_used",
        "tokens_limit",
        "tokens_remaining",
        "reset_time",
    } == PLACEHOLDERS
