"""What goes wrong when loading the config, said as file, key path and reason.

Exception hierarchy::

    InputError (tally.errors)
     └── ConfigError        the config directory is unusable; `.problems` lists every
                            ConfigProblem found in all three files, not just the first

A ConfigProblem prints as one line, e.g.
``budgets.yaml: per_user_budgets.reset_schedule.timezone: unknown time zone 'Mars/Base'``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tally.errors import InputError

__all__ = ["ConfigError", "ConfigProblem"]


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake: which file, where in it (empty for the whole file), and why."""

    file: str
    key_path: str
    reason: str

    def __str__(self) -> str:
        if not self.key_path:
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {self.key_path}: {self.reason}"


class ConfigError(InputError):
    """The config cannot be used; `problems` holds every mistake found, in file order."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)
