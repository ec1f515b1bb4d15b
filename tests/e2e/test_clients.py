"""End to end with the real upstream (oidc-provider), the real MCP server and the official MCP SDK client:

- a metadata-document client authenticating with ``private_key_jwt`` (as ChatGPT does): its document and
  key set served on loopback, every token request signed with its key;
- a pre-registered confidential client created in the admin (its ID and secret copied from the page shown
  once) completing the flow with the SDK, without registering.
"""

from __future__ import annotations

import re
import time
import uuid

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    import proxy as proxy_helpers
    from harness import tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e import proxy as proxy_helpers
    from tests.e2e.harness import tool_text


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
]


def test_metadata_document_client_with_private_key_jwt(make_stack):
    stack = make_stack()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "e2e-1", "use": "sig", "alg": "RS256"}
    documents: dict[str, dict] = {"/clients/jwks.json": {"keys": [jwk]}}
    with harness.start_document_server(documents) as host:
        client_id = host.url + "/clients/chatgpt-like.json"
        client = stack.client(client_metadata_url=client_id, mode="auto")
        documents["/clients/chatgpt-like.json"] = {
            "client_id": client_id,
            "client_name": "E2E private_key_jwt client",
            "redirect_uris": [client.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],  # no "none": an assertion is required
            "jwks_uri": host.url + "/clients/jwks.json",
        }
        provider = client.new_provider()
        prepare = provider.context.prepare_token_auth

        def with_assertion(data, headers=None):
            data, headers = prepare(data, headers)
            now = int(time.time())
            data["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            data["client_assertion"] = jwt.encode(
                {"iss": client_id, "sub": client_id, "aud": f"{stack.issuer}/token", "iat": now, "exp": now + 120,
                 "jti": str(uuid.uuid4())},
                key, algorithm="RS256", headers={"kid": "e2e-1"},
            )
            return data, headers

        provider.context.prepare_token_auth = with_assertion

        async def scenario():
            return tool_text(await client.call_tool("whoami", provider=provider))

        assert anyio.run(scenario) == "alice"
        assert ("GET", "/clients/jwks.json") in host.requests  # the proxy fetched the key set

    [token_call] = client.requests(path_suffix="/token")
    assert token_call.status == 200 and token_call.form["client_assertion"]
    assert not client.requests(path_suffix="/register")


def test_preregistered_confidential_client_created_in_the_admin(make_stack):
    from mcp.shared.auth import OAuthClientInformationFull

    proxy_helpers.collectstatic()  # production settings: the admin pages need the collected static files
    stack = make_stack()
    username, password = stack.proxy.deployment.create_admin()
    client = stack.client(mode="auto")
    with httpx.Client(base_url=stack.base_url, timeout=30, follow_redirects=True) as admin:
        login = admin.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
        admin.post("/admin/login/?next=/admin/", data={"csrfmiddlewaretoken": token, "username": username,
                                                       "password": password})
        page = admin.get("/admin/oauthproxy/client/add/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        server_id = re.search(r'<option value="([0-9a-f-]{36})"', page.text).group(1)
        shown = admin.post("/admin/oauthproxy/client/add/", data={
            "csrfmiddlewaretoken": token, "server": server_id, "name": "E2E pre-registered",
            "redirect_uris": client.redirect_uri, "confidential": "on",
        })
        assert shown.status_code == 200, shown.text[:2000]
        codes = re.findall(r"<code>([^<]+)</code>", shown.text)
        client_id, client_secret = codes[0], codes[1]
    client.storage.client_info = OAuthClientInformationFull(
        client_id=client_id, client_secret=client_secret, redirect_uris=[client.redirect_uri],
        token_endpoint_auth_method="client_secret_basic", grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
    )

    async def scenario():
        return tool_text(await client.call_tool("whoami"))

    assert anyio.run(scenario) == "alice"
    assert not client.requests(path_suffix="/register")  # pre-registered: no DCR
    [token_call] = client.requests(path_suffix="/token")
    assert token_call.status == 200 and "client_secret" not in token_call.form  # HTTP Basic
    [authorization] = client.authorizations
    assert "Registered by your administrator" in authorization.outcome.consent_pages[0]
