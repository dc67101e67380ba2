"""Where the checkout is, for tests that read its files (config/, README.md, the plugin)."""

from pathlib import Path

__all__ = ["project_root"]


def project_root() -> Path:
    """The checkout these tests belong to (tally itself no longer knows where it came from)."""
    return Path(__file__).resolve().parents[1]
