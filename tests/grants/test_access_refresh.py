"""The access policy at each upstream refresh: claims re-read (ID token or userinfo); a user no longer
admitted ends the session (invalid_grant to the client), with the upstream tokens revoked."""

import json
import secrets

import jwt
import pytest
import responses
from django.test import Client as HttpClient

from oauthproxy.grants.sessions import session_user
from oauthproxy.models import AuditEvent, UpstreamSession
from tests.conftest import UPSTREAM, make_server
from tests.factories import issue_tokens, make_client, refresh

pytestmark = pytest.mark.django_db

TOKEN_URL = f"{UPSTREAM}/token"
REVOKE_URL = f"{UPSTREAM}/revoke"


def id_token(**claims) -> str:
    body = {"sub": "user-42", "aud": "proxy-client", "iat": 1, "exp": 4_000_000_000, **claims}
    return jwt.encode(body, secrets.token_hex(32), algorithm="HS256")


def refreshed(**claims) -> dict:
    return {"access_token": "at-new-" + secrets.token_hex(4), "refresh_token": "rt-new", "expires_in": 3600,
            "id_token": id_token(**claims)}


def signed_in(server, groups):
    client = make_client(server)
    http = HttpClient()
    tokens = issue_tokens(http, server, client, expires_in=-10)  # the upstream token is due at once
    session = tokens["session"]
    session.claims = json.dumps({"email": "", "groups": groups})
    session.save()
    return http, client, tokens


def test_a_removed_group_ends_the_session_at_the_next_refresh(upstream):
    server = make_server(access={"groups": ["sales"]}, revocation_endpoint=REVOKE_URL)
    http, client, tokens = signed_in(server, ["sales"])
    upstream.add(responses.POST, TOKEN_URL, json=refreshed(groups=["engineering"]))
    upstream.add(responses.POST, REVOKE_URL)

    response = refresh(http, server, client, tokens["refresh_token"])

    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    session = UpstreamSession.objects.get()
    assert session.revoked_at is not None and "access policy" in session.revoked_reason
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.ACCESS_DENIED, detail__step="refresh").exists()
    assert any(call.request.url == REVOKE_URL for call in upstream.calls)  # the new upstream tokens too


def test_a_user_still_admitted_keeps_the_session_with_the_claims_updated(upstream):
    server = make_server(access={"groups": ["sales"]})
    http, client, tokens = signed_in(server, ["sales"])
    upstream.add(responses.POST, TOKEN_URL, json=refreshed(groups=["sales", "admins"]))

    response = refresh(http, server, client, tokens["refresh_token"])

    assert response.status_code == 200
    session = UpstreamSession.objects.get()
    assert session.revoked_at is None
    assert session_user(session).groups == ("sales", "admins")


def test_claims_re_read_from_userinfo_when_the_refresh_has_no_id_token(upstream):
    server = make_server(access={"groups": ["sales"]}, userinfo_endpoint=f"{UPSTREAM}/userinfo")
    http, client, tokens = signed_in(server, ["sales"])
    upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at-new", "expires_in": 3600})
    upstream.add(responses.GET, f"{UPSTREAM}/userinfo", json={"sub": "user-42", "groups": []})

    response = refresh(http, server, client, tokens["refresh_token"])

    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
