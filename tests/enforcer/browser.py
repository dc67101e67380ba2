"""Headless Chromium for the dashboard tests: Debian's `chromium` package, driven by
Playwright from PyPI. No browser is ever downloaded; without /usr/bin/chromium the tests
fail saying how to install it (.ci/run does)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Page, async_playwright

from tests.paths import project_root

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = project_root() / "test-artifacts"


@contextlib.asynccontextmanager
async def chromium_page(width: int = 1440, height: int = 900) -> AsyncIterator[Page]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            await browser.close()


async def log_in(page: Page, base_url: str, credential: str) -> None:
    await page.goto(f"{base_url}/admin")
    await page.fill("#credential", credential)
    await page.click("#login button[type=submit]")


async def visible_users(page: Page) -> list[str]:
    users: list[str] = await page.eval_on_selector_all(
        "#rows tr:not([hidden])", "rows => rows.map(r => r.dataset.user)")
    return users


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    return path
