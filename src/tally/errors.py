"""Every error Tally raises on purpose, in three groups that say who can fix it.

    TallyError
     ├── InputError      the caller's input: a config directory, an events file, a
     │                   replay target, a port taken (exit 1)
     ├── ClusterError    the Kafka cluster: unreachable, refused credentials, topics
     │                   that would lose data, a local broker that will not start (exit 1)
     └── RequestRefused  one HTTP request refused (auth, audit, admin API, body size):
                         answered with its `status`; never ends a process

The CLI (`tally.clierrors.guarded`) prints an `InputError` or a `ClusterError` as one
line and exits with the group's `exit_code`; the other exit codes are in `ExitCode`.
Errors nobody foresaw are not TallyErrors: a service logs them with their traceback and
exits with `ExitCode.FAILED`.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ClusterError", "ExitCode", "InputError", "PortUnavailable", "RequestRefused",
           "TallyError"]


class ExitCode(IntEnum):
    """What a `tally` command's exit status means."""

    OK = 0
    REFUSED = 1  # an InputError or a ClusterError: its one line says what to fix
    USAGE = 2  # argparse: an unknown option or a missing argument
    FAILED = 70  # a service stopped on an unforeseen error (EX_SOFTWARE), logged
    INTERRUPTED = 130  # Ctrl-C on a command that is not a service


class TallyError(Exception):
    """Base of the errors Tally raises on purpose."""

    exit_code: ExitCode = ExitCode.REFUSED


class InputError(TallyError):
    """Something the caller gave is unusable; the message says what and where."""


class PortUnavailable(InputError, OSError):
    """A service's HTTP port is taken (or not the caller's to bind)."""


class ClusterError(TallyError):
    """The Kafka cluster cannot be used as it is; the message says why."""


class RequestRefused(TallyError):
    """An HTTP request the service refuses; `status` is its answer."""

    status: int = 400
