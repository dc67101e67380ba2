"""Message templates: `{name}` placeholders filled from a decision's figures.

Only the names in PLACEHOLDERS are replaced; any other brace text is left as written, so a
template can never reach attributes or format specs the way str.format would allow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# One list of names for the renderer and the config loader's check: the loader owns it.
from tally.config.models import PLACEHOLDERS

__all__ = ["PLACEHOLDERS", "placeholders_in", "render"]


_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill each known `{name}` with str(values[name])."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(values[name]) if name in PLACEHOLDERS and name in values else match.group(0)

    return _PATTERN.sub(fill, template)


def placeholders_in(template: str) -> set[str]:
    """Every `{name}` a template uses, known or not (for the config loader's check)."""
    return set(_PATTERN.findall(template))
