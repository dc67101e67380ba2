"""What an audit query may take, and the `tally projector` options that set it: apart from
sandbox.py, so that the CLI's parser tree does not import DuckDB."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["AuditLimits", "add_limit_options"]


@dataclass(frozen=True)
class AuditLimits:
    """What one audit query may take. The defaults suit a laptop-sized projector."""

    timeout_seconds: float = 30.0
    memory_limit: str = "1GB"  # DuckDB's, for the whole instance: the fold's batches too
    spill_limit: str = "4GB"  # temp files a query may write beyond its memory
    max_rows: int = 10_000
    max_body_bytes: int = 64 * 1024
    concurrency: int = 2

    @classmethod
    def of(cls, args: argparse.Namespace) -> AuditLimits:
        return cls(timeout_seconds=args.audit_timeout, memory_limit=args.audit_memory,
                   max_rows=args.audit_rows, concurrency=args.audit_threads)


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The projector's --audit-* options; `AuditLimits.of(args)` reads them back."""
    default = AuditLimits()
    parser.add_argument("--audit-timeout", type=float, default=default.timeout_seconds,
                        help="seconds an audit query may run (default: %(default)s)")
    parser.add_argument("--audit-memory", default=default.memory_limit,
                        help="DuckDB memory limit, the fold's included (default: %(default)s)")
    parser.add_argument("--audit-rows", type=int, default=default.max_rows,
                        help="rows an audit answers at most (default: %(default)s)")
    parser.add_argument("--audit-threads", type=int, default=default.concurrency,
                        help="audit queries run at once; more are refused with 429 "
                             "(default: %(default)s)")
