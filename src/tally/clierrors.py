"""One line, never a traceback, for what a user can cause at the command line.

Every `tally` subcommand runs through `guarded`: Kafka not running, a config directory
that is missing or invalid, the reader of a pipe going away (`tally status | head -1`) and
Ctrl-C each end the command with one line on stderr (or silently, for the pipe). Commands
that need Kafka call `require_kafka` first, so they say so before any client starts (a
client that fails to start also leaves "Unclosed AIOKafkaConsumer" noise behind).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from tally.config.errors import ConfigError
from tally.errors import ClusterError, ExitCode, InputError
from tally.settings import Settings

__all__ = ["UserError", "guarded", "kafka_down", "require_kafka"]

DEFAULT_BOOTSTRAP: str = Settings.model_fields["bootstrap_servers"].default


class UserError(InputError):
    """Something the user can fix, said in one line."""


def kafka_down(bootstrap: str) -> UserError:
    if bootstrap == DEFAULT_BOOTSTRAP:
        how = "start it with `.venv/bin/tally kafka start` (or run the demo: `make run`)"
    else:
        how = "check KAFKA_BOOTSTRAP_SERVERS"
    return UserError(f"Kafka is not running at {bootstrap}: {how}")


def require_kafka(bootstrap: str, timeout: float = 2.0) -> None:
    """Raise `kafka_down` unless something listens at one of the bootstrap servers."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
            return
        except (OSError, ValueError):
            continue
    raise kafka_down(bootstrap)


def guarded(prog: str, run: Callable[[], int]) -> int:
    """`run()`'s exit code; a TallyError of the caller's input or of the cluster as one
    line (its group's exit code, see tally.errors), Ctrl-C as 130."""
    try:
        code = run()
        sys.stdout.flush()  # a closed pipe shows up here, inside the guard
        return code
    except BrokenPipeError:
        # The reader stopped reading (`| head -1`): what it wanted was printed. Point
        # stdout at /dev/null so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as error:  # one line per problem, under a line that says what it is
        print(f"{prog}: the config is invalid:\n{error}", file=sys.stderr)
        return error.exit_code
    except (InputError, ClusterError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as error:
        if not _kafka_unreachable(error):
            raise
        print(f"{prog}: {kafka_down(Settings.from_env().bootstrap_servers)}", file=sys.stderr)
    return ExitCode.REFUSED


def _kafka_unreachable(error: Exception) -> bool:
    """A broker that went away mid-command. Checked by name: importing aiokafka here would
    make `tally config check` pay for it."""
    errors = sys.modules.get("aiokafka.errors")
    return errors is not None and isinstance(error, errors.KafkaConnectionError)
