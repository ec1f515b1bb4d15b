"""My connections in a real browser (Chromium via Playwright): a user connects two MCP clients, opens
My connections, signs in through the IdP, disconnects one; that client's next gateway call gets 401 while
the other keeps working."""

from __future__ import annotations

import os
import time

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from harness import tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.harness import tool_text

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the e2e extra is not installed
    async_playwright = None

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install -e '.[e2e]')"),
    pytest.mark.skipif(not os.path.exists(harness.CHROMIUM), reason="Debian's Chromium is missing"),
]

TIMEOUT_MS = 20_000
GATEWAY_CACHE_SECONDS = 5  # the default: a revoked token is refused by the gateway within this
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}


def gateway_status(url: str, token: str) -> int:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "Authorization": f"Bearer {token}"}
    return httpx.post(url, json=INITIALIZE, headers=headers, timeout=30).status_code


def test_a_user_disconnects_one_of_two_clients(make_stack):
    stack = make_stack()
    claude = stack.client(client_name="Claude Desktop")
    cursor = stack.client(client_name="Cursor")
    assert tool_text(anyio.run(claude.call_tool, "whoami")) == "alice"
    assert tool_text(anyio.run(cursor.call_tool, "whoami")) == "alice"
    claude_token = claude.storage.tokens.access_token
    cursor_token = cursor.storage.tokens.access_token
    seen: dict[str, str] = {}

    async def scenario():
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=harness.CHROMIUM, args=harness.CHROMIUM_ARGS, timeout=TIMEOUT_MS
            )
            try:
                context = await browser.new_context()
                context.set_default_timeout(TIMEOUT_MS)
                page = await context.new_page()
                await page.goto(stack.proxy.url("/connections/"))
                await page.get_by_role("button", name="Sign in to see your connections").click()
                await page.locator("form#login input[name=login]").fill("alice")
                await page.locator("form#login button[type=submit]").click()
                allow = page.get_by_role("button", name="Allow")
                await allow.wait_for()
                await allow.click()
                await page.wait_for_url(stack.proxy.url("/connections/"))
                await expect(page.locator("dl.connection")).to_have_count(2)
                seen["before"] = await page.inner_text("body")
                connection = page.locator("dl.connection", has_text="Claude Desktop")
                await connection.get_by_role("button", name="Disconnect").click()
                await page.wait_for_url(stack.proxy.url("/connections/"))
                await expect(page.locator("dl.connection")).to_have_count(1)
                seen["after"] = await page.inner_text("body")
            finally:
                await browser.close()

    anyio.run(scenario)
    assert "Claude Desktop" in seen["before"] and "Cursor" in seen["before"] and "127.0.0.1" in seen["before"]
    assert "Claude Desktop" not in seen["after"] and "Cursor" in seen["after"]
    time.sleep(GATEWAY_CACHE_SECONDS + 1)
    assert gateway_status(stack.gateway_url, claude_token) == 401
    assert gateway_status(stack.gateway_url, cursor_token) == 200
    assert tool_text(anyio.run(cursor.call_tool, "whoami")) == "alice"
    rows = stack.proxy.sql("SELECT subject FROM oauthproxy_auditevent WHERE kind = 'user.disconnected'")
    assert rows == [("alice",)]
