"""A newcomer's first steps in the admin, in a real browser (Debian's Chromium driven by Playwright):
add a server by hand without Discover (the stored scopes are exactly the ones typed, or none), create a
team with a member, create an API token (shown once) and use it. List pages fit a 1280 px screen.

Only the proxy runs (no upstream is needed to configure a server by hand).
"""

from __future__ import annotations

import os
import re

import anyio
import httpx
import pytest

from oauthproxy.console.management.commands.team_create import TEAM_PERMISSIONS

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    import proxy as proxy_helpers
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e import proxy as proxy_helpers

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the e2e extra is not installed
    async_playwright = None

CHROMIUM, CHROMIUM_ARGS = harness.CHROMIUM, harness.CHROMIUM_ARGS
TIMEOUT_MS = 20_000

pytestmark = [
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.e2e,
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install -e '.[e2e]')"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's Chromium is missing: apt-get install chromium"),
]


@pytest.fixture(scope="module")
def static_files():
    """Production settings serve the admin's CSS/JS from STATIC_ROOT: collect them before the proxy starts."""
    proxy_helpers.collectstatic()


@pytest.fixture
def proxy(static_files):
    with proxy_helpers.start_proxy([]) as running:
        yield running


async def fill_server_by_hand(page, *, slug: str, scopes: str | None) -> None:
    await page.goto(page.url.split("/admin/")[0] + "/admin/oauthproxy/mcpserver/add/")
    await expect(page.locator("#id_scopes")).to_have_value("")  # never the JSON text "null"
    await expect(page.locator("#id_token_endpoint_auth_methods_supported")).to_have_value("")
    await page.locator("#id_slug").fill(slug)
    await page.locator("#id_name").fill(f"{slug} tools")
    await page.locator("#id_authorization_endpoint").fill("https://login.example.com/authorize")
    await page.locator("#id_token_endpoint").fill("https://login.example.com/token")
    await page.locator("#id_client_id").fill("proxy-client")
    await page.locator("#id_client_secret").fill("typed-secret")
    if scopes is not None:
        await page.locator("#id_scopes").fill(scopes)
    await page.locator("input[name=_save]").click()
    await expect(page.locator("ul.messagelist")).to_contain_text("was added successfully")


async def fits_1280(page) -> bool:
    return await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_newcomer_adds_a_server_by_hand_makes_a_team_and_an_api_token(proxy):
    deployment = proxy.deployment
    username, password = deployment.create_admin()
    deployment.manage(
        "shell", "-c",
        "from django.contrib.auth import get_user_model; get_user_model().objects.create_user('dana', password='x')",
    )
    seen: dict[str, object] = {}

    async def scenario():
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                context.set_default_timeout(TIMEOUT_MS)
                page = await context.new_page()
                await page.goto(proxy.url("/"))
                await expect(page.locator("h1")).to_be_visible()
                await page.get_by_role("link", name="Admin").first.click()
                await page.locator("#id_username").fill(username)
                await page.locator("#id_password").fill(password)
                await page.locator("input[type=submit]").click()
                await expect(page.locator("#site-name")).to_contain_text("MCP OAuth Proxy")

                # two servers by hand, without Discover: scopes typed, and none
                await fill_server_by_hand(page, slug="typed", scopes="openid email")
                await fill_server_by_hand(page, slug="blank", scopes=None)
                seen["servers_fit"] = await fits_1280(page)
                for listing in ("client", "upstreamsession", "auditevent", "team", "apitoken"):
                    await page.goto(proxy.url(f"/admin/oauthproxy/{listing}/"))
                    seen[f"{listing}_fits"] = await fits_1280(page)

                # a team, named, with a member
                await page.goto(proxy.url("/admin/oauthproxy/team/add/"))
                await page.locator("#id_name").fill("payments")
                await page.locator("#id_members_from").select_option(label="dana")
                await page.locator("#id_members_add").click()
                await page.locator("input[name=_save]").click()
                await expect(page.locator("#result_list")).to_contain_text("dana")

                # an API token, shown once
                await page.goto(proxy.url("/admin/"))
                await page.get_by_role("link", name="API tokens").first.click()
                await page.get_by_role("link", name=re.compile(r"Add API token", re.I)).click()
                await page.get_by_role("button", name="Create token").click()
                seen["token"] = (await page.locator("#api-token").inner_text()).strip()
                await page.get_by_role("link", name="Done").click()
                seen["token_list"] = await page.inner_text("#content-main")
            finally:
                await browser.close()

    anyio.run(scenario)

    rows = dict(deployment.sql("SELECT slug, scopes::text FROM oauthproxy_mcpserver"))
    assert rows == {"typed": '["openid", "email"]', "blank": "[]"}
    [(methods,)] = deployment.sql("SELECT token_endpoint_auth_methods_supported::text FROM oauthproxy_mcpserver "
                                  "WHERE slug = 'blank'")
    assert methods == '["client_secret_basic"]'
    assert all(seen[key] for key in seen if key.endswith("_fits")), seen

    [(team, members, staff)] = deployment.sql(
        "SELECT g.name, string_agg(u.username, ','), bool_and(u.is_staff) FROM auth_group g "
        "JOIN auth_user_groups ug ON ug.group_id = g.id JOIN auth_user u ON u.id = ug.user_id GROUP BY g.name"
    )
    assert (team, members, staff) == ("payments", "dana", True)
    granted = {codename for (codename,) in deployment.sql(
        "SELECT p.codename FROM auth_group_permissions gp JOIN auth_permission p ON p.id = gp.permission_id"
    )}
    assert granted == {f"{action}_{model}" for model, actions in TEAM_PERMISSIONS.items() for action in actions}

    token = seen["token"]
    assert token not in seen["token_list"]
    response = httpx.get(proxy.url("/api/v1/tokens/"), headers={"Authorization": f"Token {token}"}, timeout=10)
    assert response.status_code == 200 and response.json()["count"] == 1
