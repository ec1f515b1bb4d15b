"""The user's side in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

- The whole authorization once more, with the official MCP client waiting on a real loopback redirect
  receiver (as native MCP clients do) and the user clicking through the proxy's consent page and the
  IdP's login page.
- The admin: log in, create an MCP server, see the callback URL to whitelist at the upstream.
"""

from __future__ import annotations

import os
import re
import secrets
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    import proxy as proxy_helpers
    from harness import tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e import proxy as proxy_helpers
    from tests.e2e.harness import tool_text

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the e2e extra is not installed
    async_playwright = None

CHROMIUM, CHROMIUM_ARGS = harness.CHROMIUM, harness.CHROMIUM_ARGS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install -e '.[e2e]')"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's Chromium is missing: apt-get install chromium"),
]

TIMEOUT_MS = 20_000


async def launch(pw):
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
    context = await browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    return browser, context


def test_browser_authorization_with_the_mcp_sdk(make_stack):
    stack = make_stack()
    seen: dict[str, object] = {}

    with harness.start_redirect_receiver() as receiver:

        async def scenario():
            async with async_playwright() as pw:
                browser, context = await launch(pw)
                try:
                    page = await context.new_page()

                    async def authorize(authorize_url: str, redirect_uri: str) -> str:
                        # the SDK's redirect handler: the user's browser opens the authorization URL
                        response = await page.goto(authorize_url)
                        assert urlsplit(page.url).path == f"/oauth/{stack.slug}/consent", page.url
                        seen["consent_url"] = page.url
                        seen["consent_headers"] = await response.all_headers()
                        await expect(page.get_by_role("heading", level=1)).to_contain_text(stack.server_name)
                        seen["consent_text"] = await page.inner_text("body")

                        # the consent page refuses to be framed, even in the browser that started the flow
                        framer = await context.new_page()
                        await framer.set_content(f'<iframe src="{page.url}" width="600" height="600"></iframe>')
                        frame = framer.frames[1]
                        seen["framed_content"] = await frame.content()
                        seen["framed_url"] = frame.url
                        await framer.close()

                        await page.get_by_role("button", name="Approve").click()
                        # the upstream IdP's login page
                        login = page.locator("form#login input[name=login]")
                        await login.fill("alice")
                        await page.locator("form#login button[type=submit]").click()
                        # the IdP's own consent page (prompt=consent, offline_access)
                        await expect(page.locator("#scope")).to_contain_text("offline_access")
                        await page.get_by_role("button", name="Allow").click()
                        await page.wait_for_url(lambda url: url.startswith(redirect_uri))
                        await expect(page.locator("#done")).to_be_visible()
                        return page.url

                    client = stack.client(redirect_uri=receiver.redirect_uri, authorize=authorize)
                    return client, tool_text(await client.call_tool("whoami"))
                finally:
                    await browser.close()

        client, who = anyio.run(scenario)
        assert who == "alice"
        # the real loopback receiver got the authorization response
        method, target = receiver.next_request(timeout=5)
        assert method == "GET" and urlsplit(target).path == "/callback"

    [authorization] = client.authorizations
    params = harness.parse_redirect(authorization.outcome)
    assert params["state"] == authorization.params["state"] and params["iss"] == stack.issuer
    assert "code" in params
    headers = seen["consent_headers"]
    assert headers.get("x-frame-options", "").upper() == "DENY" or "frame-ancestors 'none'" in headers.get(
        "content-security-policy", ""
    ), headers
    # Chromium refused to render it in the frame (its error page instead of the consent page)
    assert seen["framed_url"] != seen["consent_url"] and "Approve" not in seen["framed_content"], seen["framed_url"]
    text = seen["consent_text"]
    assert "E2E MCP client" in text and "127.0.0.1" in text
    stats = stack.idp.stats()
    assert stats["logins"] == 1 and stats["consents"] == 1
    assert stats["token"]["by_grant_type"] == {"authorization_code": 1}


@pytest.fixture(scope="module")
def static_files():
    """Production settings serve the admin's CSS/JS from STATIC_ROOT: collect them before the proxy starts."""
    proxy_helpers.collectstatic()


def test_browser_admin_creates_a_server_and_sees_its_callback_url(static_files, make_stack):
    stack = make_stack()
    username, password = stack.proxy.deployment.create_admin()
    idp = stack.idp
    secret = "admin-typed-secret-" + secrets.token_urlsafe(8)
    slug = "crm"

    async def scenario():
        async with async_playwright() as pw:
            browser, context = await launch(pw)
            try:
                page = await context.new_page()
                await page.goto(stack.proxy.url("/admin/"))
                await page.locator("#id_username").fill(username)
                await page.locator("#id_password").fill(password)
                await page.locator("input[type=submit]").click()
                await expect(page.locator("#site-name")).to_contain_text("MCP OAuth Proxy")

                await page.get_by_role("link", name="MCP servers").first.click()
                await page.get_by_role("link", name=re.compile(r"Add MCP server", re.I)).click()
                await page.locator("#id_slug").fill(slug)
                await page.locator("#id_name").fill("CRM tools")
                await page.locator("#id_mcp_url").fill(stack.mcp.url)
                await page.locator("#id_authorization_endpoint").fill(idp.authorization_endpoint)
                await page.locator("#id_token_endpoint").fill(idp.token_endpoint)
                await page.locator("#id_client_id").fill("crm-proxy")
                await page.locator("#id_client_secret").fill(secret)
                await page.locator("#id_scopes").fill("openid email offline_access")
                await page.locator("#id_token_endpoint_auth_methods_supported").fill("client_secret_post")
                await page.locator("#id_userinfo_endpoint").fill(idp.userinfo_endpoint)
                await page.locator("input[name=_continue]").click()

                await expect(page.locator("ul.messagelist")).to_contain_text("was added successfully")
                callback = page.locator("code[id^='cb-']")
                await expect(callback).to_have_text(f"{stack.base_url}/oauth/{slug}/callback")
                html = await page.content()
                # the secret field is write-only
                assert await page.locator("#id_client_secret").input_value() == ""

                await page.get_by_role("link", name="MCP servers").first.click()
                listing = await page.inner_text("#result_list")
                return html, listing
            finally:
                await browser.close()

    html, listing = anyio.run(scenario)
    assert secret not in html
    assert f"{stack.base_url}/oauth/{slug}/callback" in listing
    # the server the admin created is live at once
    metadata = httpx.get(stack.proxy.url(f"/.well-known/oauth-authorization-server/oauth/{slug}"))
    assert metadata.status_code == 200 and metadata.json()["issuer"] == f"{stack.base_url}/oauth/{slug}"
    [(stored_secret_column,)] = stack.proxy.sql(
        "SELECT client_secret FROM oauthproxy_mcpserver WHERE slug = %s", (slug,)
    )
    assert secret not in stored_secret_column  # encrypted at rest
