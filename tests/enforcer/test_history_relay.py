"""GET /api/admin/history on the enforcer: the admin rule first, then the projector's
answer relayed; 503 naming where, when no projector answers. (The whole way, with a real
projector, is tests/enforcer/test_dashboard_history.py.)"""

from __future__ import annotations

import httpx

from tally.services.enforcer.api import create_app

from .kit import KEYS, filled_board, free_port, ready


def client_for(projector_url: str | None) -> httpx.AsyncClient:
    app = create_app(filled_board(), ready(), projector_url=projector_url)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://enforcer")


async def test_not_an_admin_is_refused_before_the_projector_is_asked() -> None:
    async with client_for(f"http://127.0.0.1:{free_port()}") as client:
        answer = await client.get("/api/admin/history", headers={"x-api-key": KEYS["bob"]})
    assert (answer.status_code, answer.json()["error"]) == (
        403, "admin role required: bob has role 'viewer'")


async def test_no_projector_is_a_503_that_says_where() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    async with client_for(url) as client:
        down = await client.get("/api/admin/history", headers={"x-api-key": KEYS["carol"]})
    async with client_for(None) as client:
        none = await client.get("/api/admin/history", headers={"x-api-key": KEYS["carol"]})
    assert (down.status_code, down.json()["error"]) == (
        503, f"the projector does not answer at {url}/history")
    assert none.status_code == 503
