"""POST /v1/usage: usage events over HTTP, for gateways that do not write to Kafka.

The body is one event object or a JSON array of them, at most 1 MiB. Answers:
- 202 when at least one event was accepted: `{"accepted", "rejected", "results": [...]}`
  with one result per event, in order. Rejected events of a mixed batch go to usage.dlq;
  the caller need not resend the good ones (a resend would be harmless anyway: the
  projector dedupes by event_id).
- 400 when nothing was accepted (bad JSON, or every event invalid); `details` names the
  bad fields per event. These bodies go to usage.dlq too.
- 401 without (valid) credentials, when auth.yaml requires them.
- 403 when an authenticated user reports another user's usage; nothing is recorded.
- 413 over 1 MiB; 503 when Kafka did not take the events (safe to retry).

Without authentication (auth.yaml `enabled: false` or `require_auth: false` and no
credentials sent) an event is identified by its own `user_id`. An authenticated user who
is not a gateway may leave `user_id` out: it defaults to them.

Error bodies are `{"error": "...", "details": [...]}`. The Kafka publish sits behind the
one-method `Publisher` protocol, so tests can run the app against an in-memory one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tally.auth import Authenticator, AuthError
from tally.config.loader import LiveConfig
from tally.config.models import Config, EventTimeWindow
from tally.errors import RequestRefused
from tally.identity import Directory, Principal
from tally.ops import Metrics, Readiness, ops_routes
from tally.service import decimal
from tally.services.ingest.identify import identify, may_report
from tally.services.ingest.validate import (
    admit,
    parse_batch,
    reason_kind,
    rejection,
    validate_object,
)
from tally.wire import RejectedEvent, UsageRecorded

__all__ = ["MAX_BODY_BYTES", "SOURCE", "Publisher", "count_rejected", "create_app"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
SOURCE = "http:POST /v1/usage"


class Publisher(Protocol):
    """Where ingested events go; returns once every one is durably written (or raises)."""

    async def publish(
        self, accepted: Sequence[UsageRecorded], rejected: Sequence[RejectedEvent]
    ) -> None: ...


class BodyTooLarge(RequestRefused):
    status = 413


@dataclass
class Triage:
    """One request's events sorted into accepted and rejected, with per-event results."""

    accepted: list[UsageRecorded] = field(default_factory=list)
    rejected: list[RejectedEvent] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)


def count_rejected(metrics: Metrics, rejected: Sequence[RejectedEvent]) -> None:
    for event in rejected:
        metrics.events_rejected.labels(reason_kind(event.reason)).inc()


def json_response(status: int, content: object) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def error_response(status: int, error: str, details: Sequence[object] = ()) -> Response:
    return json_response(status, {"error": error, "details": list(details)})


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused as soon as it passes `limit`: never buffer more than that."""
    declared = decimal(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def triage(
    items: list[object], body: bytes, principal: Principal | None,
    directory: Directory, window: EventTimeWindow, now: datetime,
) -> Triage:
    sorted_ = Triage()
    from_gateway = principal is not None and principal.gateway
    for index, item in enumerate(items):
        if principal is not None and not principal.gateway and isinstance(item, dict):
            item = {"user_id": principal.user_id, **item}  # a user reports as themselves
        outcome = validate_object(item)
        if not isinstance(outcome, str):
            outcome = admit(outcome, window, now)
        if not isinstance(outcome, str):
            outcome = identify(outcome, directory, from_gateway)
        if isinstance(outcome, str):
            original = body if len(items) == 1 else orjson.dumps(item)
            sorted_.rejected.append(rejection(original, outcome, SOURCE, now))
            sorted_.results.append({"index": index, "status": "rejected", "reason": outcome})
        else:
            event = outcome
            sorted_.accepted.append(event)
            sorted_.results.append({"index": index, "status": "accepted",
                                    "event_id": event.event_id, "user_id": event.user_id})
    return sorted_


def forbidden(accepted: Sequence[UsageRecorded], principal: Principal | None) -> list[str]:
    """The users a principal tried to report for but may not."""
    return sorted({e.user_id for e in accepted if not may_report(principal, e.user_id)})


@dataclass(frozen=True)
class UsageEndpoint:
    # The current ones, read per request: users.yaml and budgets.yaml may change.
    authenticators: Callable[[], Authenticator]
    windows: Callable[[], EventTimeWindow]
    publisher: Publisher
    clock: Callable[[], datetime]
    metrics: Metrics

    async def handle(self, request: Request) -> Response:
        try:
            principal = self.authenticators().authenticate(request.headers)
            body = await read_body(request)
        except AuthError as error:
            return error_response(error.status, error.reason)
        except BodyTooLarge:
            return error_response(413, f"body larger than {MAX_BODY_BYTES} bytes")
        return await self.ingest(body, principal)

    async def ingest(self, body: bytes, principal: Principal | None) -> Response:
        items = parse_batch(body)
        if isinstance(items, str):
            return await self.refuse_body(body, items)
        result = triage(items, body, principal, self.authenticators().directory,
                        self.windows(), self.clock())
        others = forbidden(result.accepted, principal)
        if others:
            return error_response(403, "you may only report your own usage",
                                  [f"not allowed to report for {u!r}" for u in others])
        return await self.record(result)

    async def refuse_body(self, body: bytes, reason: str) -> Response:
        if not await self.publish([], [rejection(body, reason, SOURCE, self.clock())]):
            return error_response(503, "could not record the rejection; retry")
        return error_response(400, "invalid request body", [reason])

    async def record(self, result: Triage) -> Response:
        if not await self.publish(result.accepted, result.rejected):
            return error_response(503, "could not record usage; retry")
        if not result.accepted:
            details = [r for r in result.results if r["status"] == "rejected"]
            return error_response(400, "no valid usage events", details)
        return json_response(202, {"accepted": len(result.accepted),
                                   "rejected": len(result.rejected),
                                   "results": result.results})

    async def publish(
        self, accepted: Sequence[UsageRecorded], rejected: Sequence[RejectedEvent]
    ) -> bool:
        try:
            await self.publisher.publish(accepted, rejected)
        except Exception:  # the I/O boundary: any Kafka failure becomes a retryable 503
            log.exception("publishing %d events failed", len(accepted) + len(rejected))
            return False
        self.metrics.events_in.labels("http").inc(len(accepted) + len(rejected))
        count_rejected(self.metrics, rejected)
        return True


def create_app(
    config: Config | LiveConfig,
    publisher: Publisher,
    *,
    config_dir: Path | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    metrics: Metrics | None = None,
    readiness: Readiness | None = None,
) -> Starlette:
    """The ingest HTTP app, with /metrics, /healthz and /readyz (ready once the usage.raw
    loop has caught up); `config_dir` resolves a relative `public_key_file`. Under a
    LiveConfig, a reloaded auth.yaml, users.yaml or budgets.yaml applies to the next request."""
    live = config if isinstance(config, LiveConfig) else LiveConfig(config, None)
    metrics = metrics or Metrics()
    endpoint = UsageEndpoint(
        live.derived(lambda current: Authenticator.build(current, config_dir)),
        lambda: live.current.budgets.per_user_budgets.event_time_window,
        publisher, clock, metrics)
    return Starlette(routes=[
        Route("/v1/usage", endpoint.handle, methods=["POST"]),
        *ops_routes(metrics, readiness or Readiness()),
    ])
