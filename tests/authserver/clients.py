"""Replaying a real MCP client's documented request sequence against the app (tests/authserver/test_clients_*.py).

Each test module states its client's requests as the client's documentation and public bug threads show
them (registration body or metadata document, authorize parameters, token and refresh requests); these
helpers drive them through the real views. Only the outside is mocked with ``responses``: the upstream
identity provider and, for metadata-document clients, the client's own document and key set.
"""

import json
import secrets
import time
import uuid

import jwt
import responses
from django.test import Client as HttpClient

from oauthproxy.models import Client, McpServer
from tests.factories import DEFAULT_CODE_VERIFIER, form_post
from tests.flows.helpers import SigningKey, authorization_flow, query_of, start_authorization


def register(http: HttpClient, server: McpServer, body: dict) -> dict:
    """RFC 7591 registration as the client sends it; answers the response body (asserts 201)."""
    response = http.post(f"/oauth/{server.slug}/register", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()


def serve_document(mock: responses.RequestsMock, document: dict, *, jwks: dict | None = None) -> None:
    """The client's metadata document (and key set) at its URLs."""
    mock.add(responses.GET, document["client_id"], json=document, headers={"Cache-Control": "max-age=3600"})
    if jwks is not None:
        mock.add(responses.GET, document["jwks_uri"], json=jwks, headers={"Cache-Control": "max-age=3600"})


def client_assertion(key: SigningKey, *, client_id: str, audience: str, **overrides) -> str:
    """An RFC 7523 client assertion as ChatGPT signs it."""
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "iat": now, "exp": now + 300,
              "jti": str(uuid.uuid4())}
    claims.update(overrides)
    return key.sign({name: value for name, value in claims.items() if value is not None})


def consent_page(http: HttpClient, server: McpServer, client: Client, **params) -> str:
    """The consent page HTML the user sees for this authorization request."""
    page = http.get(start_authorization(http, server, client, **params))
    assert page.status_code == 200
    return page.content.decode()


def connect(
    http: HttpClient,
    server: McpServer,
    client_id: str,
    *,
    redirect_uri: str,
    scope: str | None = None,
    resource: str | None = None,
    token_auth: dict | None = None,
    basic: str | None = None,
) -> dict:
    """authorize → consent → upstream → callback → token → refresh, as the client does them. *token_auth*
    adds the client's authentication parameters to each token request (a callable may return fresh ones).
    Answers ``{"tokens": ..., "refreshed": ..., "location": ...}``."""
    client = Client.objects.get(server=server, client_id=client_id)
    flow = authorization_flow(http, server, client, redirect_uri=redirect_uri, scope=scope, resource=resource)
    headers = {"HTTP_AUTHORIZATION": basic} if basic else {}

    def auth() -> dict:
        values = token_auth() if callable(token_auth) else (token_auth or {"client_id": client_id})
        return dict(values)

    extra = {"resource": resource} if resource else {}
    tokens = form_post(http, f"/oauth/{server.slug}/token", {
        "grant_type": "authorization_code", "code": flow.code, "redirect_uri": redirect_uri,
        "code_verifier": DEFAULT_CODE_VERIFIER, **extra, **auth(),
    }, **headers)
    assert tokens.status_code == 200, tokens.content
    refreshed = form_post(http, f"/oauth/{server.slug}/token", {
        "grant_type": "refresh_token", "refresh_token": tokens.json()["refresh_token"], **extra, **auth(),
    }, **headers)
    assert refreshed.status_code == 200, refreshed.content
    return {"tokens": tokens.json(), "refreshed": refreshed.json(), "location": flow.location,
            "query": query_of(flow.location)}


def new_key() -> SigningKey:
    return SigningKey(kid="key-" + secrets.token_hex(4))


__all__ = ["client_assertion", "connect", "consent_page", "jwt", "new_key", "register", "serve_document"]
