"""The server's access policy at the upstream callback (DESIGN §4 "Access"): a refused user sees a page
that says so, the client gets access_denied with its state, nothing is stored but an audit event, and the
upstream tokens are revoked."""

import json
import secrets

import jwt
import pytest
import responses
from django.contrib.auth.models import Group
from django.db import connection

from oauthproxy.core import metrics
from oauthproxy.grants.sessions import session_user
from oauthproxy.models import AuditEvent, Grant, UpstreamSession
from oauthproxy.upstream.client import upstream_nonce
from tests.conftest import make_server
from tests.flows.helpers import DEFAULT_REDIRECT_URI, DEFAULT_STATE, callback, make_client, query_of, upstream_redirect

pytestmark = pytest.mark.django_db


def id_token(server, **claims) -> str:
    """An ID token as the token endpoint returns it (no issuer configured: the signature is not checked)."""
    body = {"sub": "user-1", "aud": server.client_id, "iat": 1, "exp": 4_000_000_000, **claims}
    return jwt.encode(body, secrets.token_hex(32), algorithm="HS256")


def tokens(server, **claims) -> dict:
    return {"access_token": "up-at-" + secrets.token_hex(8), "refresh_token": "up-rt-" + secrets.token_hex(8),
            "token_type": "Bearer", "expires_in": 3600, "id_token": id_token(server, **claims)}


def sign_in(browser, upstream, server, **claims):
    state = query_of(upstream_redirect(browser, server, make_client(server)))["state"]
    body = tokens(server, nonce=upstream_nonce(state), **claims)  # the ID token echoes this login's nonce
    upstream.add(responses.POST, server.token_endpoint, json=body)
    return callback(browser, server, state=state), body


def failed(slug: str) -> float:
    return metrics.AUTHORIZATIONS_FAILED.labels(server=slug, reason="access_denied")._value.get()


def test_a_refused_user_sees_a_page_and_nothing_is_stored(browser, upstream):
    team = Group.objects.create(name="sales-engineering")
    server = make_server(access={"groups": ["sales"]}, team=team,
                         revocation_endpoint="https://idp.example.com/revoke")
    upstream.add(responses.POST, server.revocation_endpoint)
    before = failed("crm")

    response, body = sign_in(browser, upstream, server, email="bob@example.com", groups=["engineering"])

    assert response.status_code == 403
    page = response.content.decode()
    assert "CRM tools" in page and "bob@example.com" in page and "sales-engineering" in page
    assert response["X-Frame-Options"] == "DENY"
    # The way back to the client carries access_denied with its state and our issuer.
    link = page.split('id="return-to-client" href="')[1].split('"')[0].replace("&amp;", "&")
    assert link.startswith(DEFAULT_REDIRECT_URI + "?")
    params = query_of(link)
    assert params["error"] == "access_denied" and params["state"] == DEFAULT_STATE
    assert params["iss"] == server.issuer_url and "code" not in params
    # Nothing stored but the audit event; the upstream tokens were revoked.
    assert not UpstreamSession.objects.exists() and not Grant.objects.exists()
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.ACCESS_DENIED)
    assert event.subject == "user-1" and event.detail["step"] == "login"
    revoked = [call.request.body for call in upstream.calls if call.request.url == server.revocation_endpoint]
    assert any(body["refresh_token"] in r for r in revoked) and any(body["access_token"] in r for r in revoked)
    assert failed("crm") == before + 1
    # No token in the page.
    assert body["access_token"] not in page and body["refresh_token"] not in page


def test_an_admitted_user_gets_a_code_and_the_claims_are_kept_encrypted(browser, upstream):
    server = make_server(access={"groups": ["admins"]}, groups_claim="realm_access.roles")
    response, _ = sign_in(browser, upstream, server, email="Ann@Example.com",
                          realm_access={"roles": ["admins", "users"]})
    assert response.status_code == 302 and "code" in query_of(response["Location"])
    session = UpstreamSession.objects.get()
    user = session_user(session)
    assert user.email == "ann@example.com" and user.groups == ("admins", "users")
    with connection.cursor() as cursor:
        cursor.execute("SELECT claims FROM oauthproxy_upstreamsession")
        stored = cursor.fetchone()[0]
    assert "ann@example.com" not in stored and "admins" not in stored


def test_userinfo_completes_claims_the_id_token_lacks(browser, upstream):
    server = make_server(access={"groups": ["sales"]}, userinfo_endpoint="https://idp.example.com/userinfo")
    upstream.add(responses.GET, server.userinfo_endpoint, json={"sub": "user-1", "groups": ["sales"]})
    response, _ = sign_in(browser, upstream, server, email="x@example.com")
    assert response.status_code == 302 and "code" in query_of(response["Location"])


def test_userinfo_of_another_subject_is_ignored(browser, upstream):
    server = make_server(access={"groups": ["sales"]}, userinfo_endpoint="https://idp.example.com/userinfo")
    upstream.add(responses.GET, server.userinfo_endpoint, json={"sub": "someone-else", "groups": ["sales"]})
    response, _ = sign_in(browser, upstream, server, email="x@example.com")
    assert response.status_code == 403


def test_an_unverified_email_is_not_admitted(browser, upstream):
    server = make_server(access={"emails": ["boss@example.com"]})
    response, _ = sign_in(browser, upstream, server, email="boss@example.com", email_verified=False)
    assert response.status_code == 403


def test_no_policy_admits_everyone_as_before(browser, upstream):
    server = make_server()
    response, _ = sign_in(browser, upstream, server)
    assert response.status_code == 302 and "code" in query_of(response["Location"])
    assert json.loads(UpstreamSession.objects.get().claims) == {"email": "", "groups": []}


def test_the_consent_page_names_the_limited_tools(browser, upstream):
    from tests.flows.helpers import start_authorization

    server = make_server(tool_policy=[{"tools": ["admin_*"], "groups": ["admins"]}])
    page = browser.get(start_authorization(browser, server, make_client(server))).content.decode()
    assert 'id="tool-policy"' in page and "admin_*" in page and "admins" in page
