"""The OpenAPI document, the dashboard page, /metrics, /healthz and /readyz of the enforcer."""

from __future__ import annotations

from starlette.routing import Route

from tally.ops import Readiness
from tally.services.enforcer.api import create_app

from .kit import asgi_client, filled_board, ready


async def test_openapi_documents_every_api_route_and_its_bodies() -> None:
    async with asgi_client(filled_board()) as client:
        document = (await client.get("/openapi.json")).json()
    app = create_app(filled_board(), ready())
    api_paths = {r.path for r in app.routes if isinstance(r, Route) and r.path.startswith("/api")}
    assert set(document["paths"]) == api_paths
    schemas = document["components"]["schemas"]
    assert {"BudgetsResponse", "BudgetRow", "BudgetDecided", "MyBudget", "AlertsResponse",
            "BudgetAlerted", "ErrorBody"} <= set(schemas)
    assert schemas["BudgetRow"]["required"] == [
        "user_id", "daily_used", "daily_limit", "daily_remaining", "monthly_used",
        "monthly_limit", "status", "decision"]
    for path in document["paths"].values():
        refs = str(path)
        for name in [part.split("'")[0] for part in refs.split("#/components/schemas/")[1:]]:
            assert name in schemas, name


async def test_the_dashboard_is_one_self_contained_page() -> None:
    async with asgi_client(filled_board()) as client:
        page = await client.get("/admin")
        home = await client.get("/", follow_redirects=False)
    assert page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "/api/admin/stream" in page.text and "<script src" not in page.text
    assert home.headers["location"] == "/admin"


async def test_metrics_count_decisions_by_status_and_published_alerts() -> None:
    async with asgi_client(filled_board()) as client:
        text = (await client.get("/metrics")).text
    for line in ['tally_decisions{status="ok"} 3.0', 'tally_decisions{status="warning"} 1.0',
                 'tally_decisions{status="over_limit"} 1.0',
                 'tally_alerts_published_total{kind="warning"} 2.0',
                 'tally_alerts_published_total{kind="limit"} 1.0']:
        assert line in text.splitlines(), line


async def test_ready_only_once_caught_up_and_alive_all_along() -> None:
    readiness = Readiness()
    async with asgi_client(filled_board(), readiness) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        waiting = await client.get("/readyz")
        readiness.ready = True
        caught_up = await client.get("/readyz")
    assert (waiting.status_code, waiting.json()) == (503, {"status": "not ready",
                                                           "detail": "starting"})
    assert caught_up.status_code == 200
