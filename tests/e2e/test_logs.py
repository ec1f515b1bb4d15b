"""No credential in any log line (DESIGN §5.2, issue 13 finding 7): a whole flow through a real uvicorn
process (authorization, callback, code exchange, tool calls, refresh, revocation), then every line the
proxy process wrote (its own loggers and uvicorn's access log alike) is searched for the codes, states,
tokens and secrets of that flow."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from conftest import UPSTREAM_CLIENT_SECRET
    from harness import bearer_of, sleep_until, tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.conftest import UPSTREAM_CLIENT_SECRET
    from tests.e2e.harness import bearer_of, sleep_until, tool_text

pytestmark = [
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.e2e,
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]


def test_no_code_state_token_or_secret_in_any_log_line(make_stack):
    stack = make_stack(server={"access_token_lifetime": 3})
    client = stack.client(client_name="Log probe")
    secrets: dict[str, str] = {"upstream client secret": UPSTREAM_CLIENT_SECRET}

    async def scenario():
        app = client.new_provider()
        assert tool_text(await client.call_tool("whoami", provider=app)) == "alice"
        async with client.connect() as session:
            secrets["upstream access token"] = bearer_of(await session.call_tool("echo_auth", {}))
        secrets["first proxy access token"] = client.storage.tokens.access_token
        secrets["first proxy refresh token"] = client.storage.tokens.refresh_token
        await sleep_until(app.context.token_expiry_time + 0.5)  # the proxy token expires: refresh
        assert tool_text(await client.call_tool("whoami", provider=app)) == "alice"

    anyio.run(scenario)
    for number, authorization in enumerate(client.authorizations):
        secrets[f"proxy authorization code {number}"] = authorization.outcome.params["code"]
        secrets[f"client state {number}"] = authorization.params["state"]
        for _method, url, _status in authorization.outcome.trail:
            if urlsplit(url).path == f"/oauth/{stack.slug}/callback":
                callback = harness.parse_redirect(url)
                secrets["upstream authorization code"] = callback["code"]
                secrets[f"upstream state {number}"] = callback["state"]
    for call in client.requests(path_suffix="/token"):
        for name in ("code_verifier", "refresh_token", "client_secret"):
            if call.form.get(name):
                secrets[f"token request {name} {call.form[name][:4]}"] = call.form[name]
    assert "upstream authorization code" in secrets, authorization.outcome.trail
    tokens = client.storage.tokens
    secrets["proxy access token"], secrets["proxy refresh token"] = tokens.access_token, tokens.refresh_token
    # revocation, and a request with the revoked token
    info = client.storage.client_info
    credentials = {"client_id": info.client_id}
    if info.client_secret:
        secrets["client secret"] = credentials["client_secret"] = info.client_secret
    revoked = httpx.post(f"{stack.issuer}/revoke", data={"token": tokens.refresh_token, **credentials}, timeout=30)
    assert revoked.status_code == 200
    httpx.post(stack.gateway_url, headers={"Authorization": f"Bearer {tokens.access_token}"}, json={}, timeout=30)
    time.sleep(0.5)  # the last access log lines are written after the responses

    log = stack.proxy.process.log_path.read_text(errors="replace")
    assert f"/oauth/{stack.slug}/callback?" in log  # the access log is there, with the callback's line
    leaked = {name: value for name, value in secrets.items() if value and len(value) >= 8 and value in log}
    assert not leaked, f"credentials in the proxy's log: {sorted(leaked)}"
