"""A team member's self-service in a real browser (Debian's Chromium driven by Playwright): log in, add a
server from the upstream's issuer URL with the admin's Discover tool, run the connection check and see the
callback URL to whitelist; whitelist it at the upstream, check again, and "Try it": the real login at the
upstream as the admin, ending on the result page (subject, scopes, expiry; no token, nothing stored).

The team and its member are made the way an operator makes them: `manage.py team_create NAME --member USER`
against the running deployment's database.
"""

from __future__ import annotations

import os
import re
import secrets

import anyio
import pytest

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
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install -e '.[e2e]')"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's Chromium is missing: apt-get install chromium"),
]

TEAM = "sales-eng"
MEMBER = "bea"
SLUG = "crm"
UPSTREAM_CLIENT_ID = "crm-proxy"


@pytest.fixture(scope="module")
def static_files():
    """Production settings serve the admin's CSS/JS from STATIC_ROOT: collect them before the proxy starts."""
    proxy_helpers.collectstatic()


def team_member(deployment: proxy_helpers.ProxyDeployment) -> str:
    """A user (not staff, not superuser) made a member of a new team with `team_create`; its password."""
    password = secrets.token_urlsafe(16)
    deployment.manage(
        "shell", "-c",
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({MEMBER!r}, password={password!r})",
    )
    out = deployment.manage("team_create", TEAM, "--member", MEMBER)
    assert f"member: {MEMBER}" in out
    return password


def test_team_member_adds_a_server_by_discovery_checks_it_and_tries_it(static_files, make_stack):
    stack = make_stack()
    idp = stack.idp
    deployment = stack.proxy.deployment
    password = team_member(deployment)
    callback_url = f"{stack.base_url}/oauth/{SLUG}/callback"
    secret = "team-typed-secret-" + secrets.token_urlsafe(8)
    seen: dict[str, str] = {}

    async def scenario():
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
            try:
                context = await browser.new_context()
                context.set_default_timeout(TIMEOUT_MS)
                page = await context.new_page()

                # log in as the team member
                await page.goto(stack.proxy.url("/admin/"))
                await page.locator("#id_username").fill(MEMBER)
                await page.locator("#id_password").fill(password)
                await page.locator("input[type=submit]").click()
                await expect(page.locator("#site-name")).to_contain_text("MCP OAuth Proxy")
                # the team sees none of the other servers (the stack's own belongs to no team)
                await page.get_by_role("link", name="MCP servers").first.click()
                await expect(page.locator("#content-main")).not_to_contain_text(stack.server_name)

                # add a server from the issuer URL with the Discover tool
                await page.get_by_role("link", name=re.compile(r"Add MCP server", re.I)).click()
                await page.get_by_role("link", name="Discover from issuer").click()
                await page.locator("#id_issuer").fill(idp.issuer)
                await page.locator("input[type=submit][value=Discover]").click()
                found = page.locator("table.op-table")
                await expect(found).to_contain_text(idp.token_endpoint)
                await expect(found).to_contain_text(idp.userinfo_endpoint)
                await page.get_by_role("button", name="Start a new server with the selected values").click()

                # the add form comes back filled in from the upstream's metadata
                await expect(page.locator("#id_authorization_endpoint")).to_have_value(idp.authorization_endpoint)
                await expect(page.locator("#id_token_endpoint")).to_have_value(idp.token_endpoint)
                await expect(page.locator("#id_issuer")).to_have_value(idp.issuer)
                await expect(page.locator("#id_userinfo_endpoint")).to_have_value(idp.userinfo_endpoint)
                await expect(page.locator("#id_team option:checked")).to_have_text(TEAM)
                seen["scopes"] = await page.locator("#id_scopes").input_value()
                await page.locator("#id_slug").fill(SLUG)
                await page.locator("#id_name").fill("CRM tools")
                await page.locator("#id_mcp_url").fill(stack.mcp.url)
                await page.locator("#id_client_id").fill(UPSTREAM_CLIENT_ID)
                await page.locator("#id_client_secret").fill(secret)
                await page.locator("input[name=_continue]").click()
                await expect(page.locator("ul.messagelist")).to_contain_text("was added successfully")
                await expect(page.locator("code[id^='cb-']")).to_have_text(callback_url)
                server_page = page.url

                # the connection check shows the callback URL to whitelist; the upstream does not know the
                # client yet
                await page.get_by_role("link", name="Check connection").click()
                await page.get_by_role("button", name="Run the check").click()
                await expect(page.get_by_text("Callback URL to whitelist at the upstream:")).to_be_visible()
                await expect(page.locator("#content-main p code")).to_have_text(callback_url)
                credential_row = page.locator("tr", has_text="Client credential at the token endpoint")
                await expect(credential_row).to_contain_text("rejected the client credential")
                seen["check_before"] = await page.inner_text("#content-main")

                # the team registers the client at the upstream with that callback URL, and checks again
                idp.add_client({
                    "client_id": UPSTREAM_CLIENT_ID,
                    "client_secret": secret,
                    "redirect_uris": [callback_url],
                    "token_endpoint_auth_method": "client_secret_basic",
                    "grant_types": ["authorization_code", "refresh_token"],
                })
                await page.get_by_role("button", name="Run again").click()
                await expect(credential_row).to_contain_text("accepted the client credential")
                await expect(page.locator("tr", has_text="Authorization endpoint")).to_contain_text("Reachable")

                # Try it: the real login at the upstream, as this admin
                idp.reset_stats()  # the checks exchanged made-up codes; count the test's calls alone
                await page.goto(server_page)
                await page.get_by_role("link", name="Try it").click()
                await page.get_by_role("button", name="Log in at the upstream").click()
                await page.locator("form#login input[name=login]").fill("bea.upstream")
                await page.locator("form#login button[type=submit]").click()
                await expect(page.locator("#scope")).to_contain_text("offline_access")
                await page.get_by_role("button", name="Allow").click()
                await page.wait_for_url(re.compile(r"/admin/oauthproxy/mcpserver/[^/]+/try-it/\d+/$"))
                await expect(page.locator("#try-it-outcome")).to_contain_text("Success")
                seen["result"] = await page.inner_text("#try-it-result")
                seen["result_html"] = await page.content()
            finally:
                await browser.close()

    anyio.run(scenario)

    assert "offline_access" in seen["scopes"].split()
    assert callback_url in seen["check_before"]
    result = seen["result"]
    assert "bea.upstream" in result  # the subject
    assert "From the ID token's sub claim, signature checked" in result
    assert "30 seconds" in result  # the IdP's access token lifetime
    assert re.search(r"Refresh token issued\s+yes", result) and re.search(r"ID token present\s+yes", result)
    assert "client_secret_basic" in result and "revoked at the upstream" in result
    assert secret not in seen["result_html"]
    # one login, exchanged once, both tokens revoked at the upstream, nothing kept at the proxy
    stats = idp.stats()
    assert stats["logins"] == 1
    assert stats["token"]["by_client"][UPSTREAM_CLIENT_ID] == {"authorization_code": 1}
    assert stats["revocation"]["by_client"].get(UPSTREAM_CLIENT_ID) == 2
    for table in ("oauthproxy_upstreamsession", "oauthproxy_grant", "oauthproxy_accesstoken"):
        [(count,)] = stack.proxy.sql(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
        assert count == 0, table
    [(actor, detail_ok)] = stack.proxy.sql(
        "SELECT u.username, (e.detail->>'ok')::boolean FROM oauthproxy_auditevent e "
        "JOIN auth_user u ON u.id = e.actor_id WHERE e.kind = 'admin.try_it'"
    )
    assert (actor, detail_ok) == (MEMBER, True)
    [(team,)] = stack.proxy.sql(
        "SELECT g.name FROM oauthproxy_mcpserver s JOIN auth_group g ON g.id = s.team_id WHERE s.slug = %s", (SLUG,)
    )
    assert team == TEAM
