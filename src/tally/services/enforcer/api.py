"""The enforcer's HTTP API and dashboard (served on TALLY_ENFORCER_PORT, default 8083).

    GET /api/admin/budgets   every user's budget + decision (?status= &role= &department=)
    GET /api/admin/alerts    recent alerts, newest first (?limit=, default 100)
    GET /api/admin/stream    server-sent events for the dashboard (see openapi.py)
    GET /api/admin/history   daily use per user and model, from the projector (?days=)
    GET /api/budgets/me      the caller's own budget, decision and reset times
    GET /admin               the live dashboard (one static page; it logs in by itself)
    GET /openapi.json        the OpenAPI document
    GET /metrics, /healthz, /readyz

Handlers only check access and shape what the Board holds. Errors are JSON
`{"error": ..., "details": [...]}`: 400 a bad parameter, 401 no or bad credentials (with
`WWW-Authenticate: Bearer`), 403 not an admin (see access.py for the rules).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tally.access import Access
from tally.auth import AuthError
from tally.config.models import Config
from tally.errors import RequestRefused
from tally.identity import Principal
from tally.ops import Readiness, ops_routes
from tally.service import decimal
from tally.services.enforcer.board import MAX_ALERTS, STATUSES, Board, Filters
from tally.services.enforcer.openapi import openapi_document

__all__ = ["DASHBOARD", "ApiError", "create_app"]

DASHBOARD = Path(__file__).with_name("admin-dashboard.html")
FILTERS = ("status", "role", "department")
# The page is self-contained: it talks to this origin only and is never framed.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

Handler = Callable[[Request, Principal], Awaitable[Response]]


class ApiError(RequestRefused):
    def __init__(self, status: int, error: str, details: list[str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.details = status, error, details or []


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def error_response(error: ApiError) -> Response:
    response = json_response({"error": error.error, "details": error.details}, error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def filters_of(request: Request) -> Filters:
    params = request.query_params
    unknown = sorted(set(params) - set(FILTERS))
    if unknown:
        expected = f"expected one of {', '.join(FILTERS)}"
        raise ApiError(400, "unknown query parameter", [f"{n!r}: {expected}" for n in unknown])
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "unknown status", [f"{status!r}: expected one of "
                                               f"{', '.join(STATUSES)}"])
    return {key: params[key] for key in FILTERS if key in params}


def limit_of(request: Request) -> int:
    limit = decimal(request.query_params.get("limit", "100"))
    if limit is None or not 1 <= limit <= MAX_ALERTS:
        raise ApiError(400, "bad limit", [f"limit must be an integer from 1 to {MAX_ALERTS}"])
    return limit


# The caller's credential goes on to the projector, which checks it again (same rule).
FORWARDED = ("authorization", "x-api-key")


class Api:
    """The handlers, over one Board; the access rules follow a reloaded users.yaml."""

    def __init__(self, board: Board, config_dir: Path | None,
                 clock: Callable[[], datetime], projector_url: str | None = None) -> None:
        self.board, self.config_dir, self.clock = board, config_dir, clock
        self.projector_url = projector_url
        self._access: tuple[Config, Access] | None = None

    def access(self) -> Access:
        config = self.board.enforcer.config
        if self._access is None or self._access[0] is not config:
            self._access = (config, Access.build(config, self.config_dir))
        return self._access[1]

    def admin(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(lambda request: self.access().admin(request), handler)

    def user(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(lambda request: self.access().caller(request), handler)

    @staticmethod
    def _guarded(check: Callable[[Request], Principal],
                 handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request, check(request))
            except AuthError as error:
                return error_response(ApiError(error.status, error.reason))
            except ApiError as error:
                return error_response(error)

        return endpoint

    async def budgets(self, request: Request, _: Principal) -> Response:
        return json_response({"users": self.board.rows(filters_of(request))})

    async def alerts(self, request: Request, _: Principal) -> Response:
        return json_response({"alerts": self.board.alerts(limit_of(request))})

    async def me(self, request: Request, caller: Principal) -> Response:
        return json_response(self.board.mine(caller.user_id, self.clock()))

    async def history(self, request: Request, _: Principal) -> Response:
        """The projector's GET /history, relayed: the usage history lives in its DuckDB
        file, which only the projector may open while it runs."""
        if self.projector_url is None:
            raise ApiError(503, "no projector configured for the usage history")
        url = f"{self.projector_url.rstrip('/')}/history"
        headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.get(url, params=request.query_params, headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(503, f"the projector does not answer at {url}",
                           [str(error) or type(error).__name__]) from error
        return Response(answer.content, answer.status_code, media_type="application/json")

    async def stream(self, request: Request, _: Principal) -> Response:
        queue, first = self.board.open_stream()
        return StreamingResponse(self.board.hub.stream(queue, first),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})


def create_app(board: Board, readiness: Readiness, *, config_dir: Path | None = None,
               clock: Callable[[], datetime] = lambda: datetime.now(UTC),
               projector_url: str | None = None) -> Starlette:
    """`config_dir` resolves a relative JWT `public_key_file`; `clock` dates /me answers
    for users who have no decision yet; `projector_url` answers the usage history."""
    api = Api(board, config_dir, clock, projector_url)
    page = DASHBOARD.read_bytes()
    document = orjson.dumps(openapi_document())

    async def dashboard(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=DASHBOARD_HEADERS)

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def home(request: Request) -> Response:
        return RedirectResponse("/admin")

    return Starlette(routes=[
        Route("/api/admin/budgets", api.admin(api.budgets), methods=["GET"]),
        Route("/api/admin/alerts", api.admin(api.alerts), methods=["GET"]),
        Route("/api/admin/stream", api.admin(api.stream), methods=["GET"]),
        Route("/api/admin/history", api.admin(api.history), methods=["GET"]),
        Route("/api/budgets/me", api.user(api.me), methods=["GET"]),
        Route("/admin", dashboard, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", home, methods=["GET"]),
        *ops_routes(board.metrics, readiness),
    ])
