"""The dashboard at 1,000 users, in a real headless Chromium, over an in-memory Enforcer:
it renders quickly, searches, sorts, and updates one row in place when it changes."""

from __future__ import annotations

import time

from tally.services.enforcer.board import Board
from tally.services.enforcer.state import Enforcer

from .browser import chromium_page, log_in, screenshot, visible_users
from .kit import KEYS, NOON, balances, config, events, served

TEAM = 1000


def big_board() -> Board:
    cfg = config()
    board = Board(Enforcer(cfg))
    usage = {f"u{n:04d}": (n * 37) % 1300 for n in range(TEAM)}  # 0..1299 of 1000: all statuses
    board.record(board.enforcer.on_balances(balances(cfg, events(usage)), NOON))
    return board


async def test_a_thousand_users_render_search_sort_and_update_in_place() -> None:
    board = big_board()
    everyone = len(board.enforcer.current())
    async with served(board) as url, chromium_page() as page:
        started = time.monotonic()
        await log_in(page, url, KEYS["carol"])
        await page.wait_for_function(f"document.querySelectorAll('#rows tr').length == {everyone}")
        assert time.monotonic() - started < 10
        assert await page.inner_text("#n-all") == str(everyone)

        await page.fill("#search", "u0420")
        assert await visible_users(page) == ["u0420"]
        await page.fill("#search", "")

        await page.click("th[data-sort=daily]")  # highest daily use first
        first = (await visible_users(page))[0]
        assert board.enforcer.published[first].daily.tokens_used == 1299

        await page.evaluate("document.querySelector('tr[data-user=u0001]').__kept = true")
        later = NOON.replace(hour=13)
        found = balances(board.enforcer.config, events({"u0001": 1250}, later), later)
        board.record(board.enforcer.on_balances(found, later))
        await page.wait_for_selector("tr[data-user=u0001][data-status=over_limit]")
        assert await page.evaluate("document.querySelector('tr[data-user=u0001]').__kept")
        await screenshot(page, "dashboard-1000-users.png")
