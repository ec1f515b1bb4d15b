"""My connections (``BASE/connections/``): a user signs in through a server's upstream, sees only the MCP
clients they approved there, and disconnects one (tokens revoked, consent forgotten, upstream token
revoked unless another of their clients still uses it). The upstream is mocked at the HTTP boundary."""

import secrets

import jwt
import pytest
import responses
from django.test import Client as HttpClient

from oauthproxy.authserver.views.connections import CONNECTIONS_COOKIE, SIGNIN_COOKIE
from oauthproxy.core.crypto import token_checksum as checksum
from oauthproxy.models import AccessToken, AuditEvent, Consent, PendingAuthorization, UpstreamSession
from oauthproxy.upstream.client import upstream_nonce
from tests.conftest import UPSTREAM, make_server
from tests.factories import redeem_code
from tests.flows.helpers import authorization_flow, make_client, query_of, upstream_token_response

pytestmark = pytest.mark.django_db


@pytest.fixture
def server(db):
    return make_server(
        slug="crm", userinfo_endpoint=f"{UPSTREAM}/userinfo", revocation_endpoint=f"{UPSTREAM}/revoke"
    )


def connect(server, *, subject: str, name: str, remember: bool = True):
    """An MCP client that `subject` connected through the real authorization flow, with its tokens."""
    client = make_client(server, name=name)
    browser = HttpClient()
    result = authorization_flow(browser, server, client, remember=remember, userinfo={"sub": subject})
    response = redeem_code(browser, server, client, result.code, code_verifier=result.code_verifier)
    assert response.status_code == 200, response.content
    return client, response.json()


def sign_in(browser: HttpClient, server, *, subject: str, tokens: dict | None = None):
    """Sign in to My connections through `server`'s upstream; answer the upstream calls made."""
    response = browser.post("/connections/", {"action": "signin", "server": server.slug})
    assert response.status_code == 302, response.content.decode()[:500]
    params = query_of(response["Location"])
    assert response["Location"].startswith(server.authorization_endpoint)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.token_endpoint, json=tokens or upstream_token_response())
        upstream.add(responses.GET, server.userinfo_endpoint, json={"sub": subject})
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        back = browser.get(f"/oauth/{server.slug}/callback", {"state": params["state"], "code": "c-1"})
        calls = [call.request.url for call in upstream.calls]
    assert back.status_code == 302 and back["Location"] == "/connections/", back.content.decode()[:500]
    return calls


def page(browser: HttpClient) -> str:
    response = browser.get("/connections/")
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in response["Content-Security-Policy"]
    return response.content.decode()


def test_signing_in_keeps_no_upstream_token_and_is_bound_to_the_browser(server):
    browser = HttpClient()
    response = browser.post("/connections/", {"action": "signin", "server": "crm"})
    pending = PendingAuthorization.objects.get()
    assert pending.for_connections and pending.client is None and pending.tester is None
    assert pending.state_checksum == checksum(query_of(response["Location"])["state"])
    assert browser.cookies[SIGNIN_COOKIE]["path"] == "/oauth/crm/callback"
    # Another browser cannot complete it.
    stranger = HttpClient()
    back = stranger.get("/oauth/crm/callback", {"state": query_of(response["Location"])["state"], "code": "c"})
    assert back.status_code == 403 and CONNECTIONS_COOKIE not in stranger.cookies


def test_the_page_lists_only_the_signed_in_users_own_connections(server):
    connect(server, subject="alice", name="Alice's Claude")
    connect(server, subject="bob", name="Bob's Cursor")
    browser = HttpClient()
    assert "Alice&#x27;s Claude" not in page(browser)  # not signed in: nothing listed
    calls = sign_in(browser, server, subject="alice")
    assert f"{UPSTREAM}/revoke" in calls  # the sign-in's own upstream tokens are not kept
    assert UpstreamSession.objects.count() == 2  # and it stored no session
    body = page(browser)
    assert "Alice&#x27;s Claude" in body and "Bob&#x27;s Cursor" not in body
    assert "127.0.0.1" in body  # the redirect host
    cookie = browser.cookies[CONNECTIONS_COOKIE]
    assert cookie["httponly"] and cookie["path"] == "/connections/" and "alice" not in cookie.value.split(":")[0]


def test_a_tampered_cookie_signs_nobody_in(server):
    connect(server, subject="alice", name="Alice's Claude")
    browser = HttpClient()
    browser.cookies[CONNECTIONS_COOKIE] = f'{{"{server.pk}": ["alice", 9999999999]}}'
    assert "Alice&#x27;s Claude" not in page(browser)


def test_disconnect_revokes_tokens_forgets_consent_and_audits(server):
    claude, _ = connect(server, subject="alice", name="Claude")
    cursor, _ = connect(server, subject="alice", name="Cursor")
    assert Consent.objects.filter(client=claude).exists()
    browser = HttpClient()
    sign_in(browser, server, subject="alice")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        response = browser.post("/connections/", {"action": "disconnect", "server": "crm", "client": claude.pk})
        revoked_upstream = len(upstream.calls)
    assert response.status_code == 302
    assert not UpstreamSession.objects.filter(client=claude, revoked_at__isnull=True).exists()
    assert not AccessToken.objects.filter(application=claude).exists()
    assert not Consent.objects.filter(client=claude).exists()
    # Cursor still works, so the shared upstream login was not revoked.
    assert revoked_upstream == 0
    assert UpstreamSession.objects.filter(client=cursor, revoked_at__isnull=True).exists()
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.USER_DISCONNECTED)
    assert event.subject == "alice" and event.client == claude
    body = page(browser)
    assert "Cursor" in body and ">Claude<" not in body
    # The last one: now the upstream token is revoked too.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        browser.post("/connections/", {"action": "disconnect", "server": "crm", "client": cursor.pk})
        assert len(upstream.calls) >= 1


def test_a_user_cannot_disconnect_someone_elses_client(server):
    bobs, _ = connect(server, subject="bob", name="Bob's Cursor")
    browser = HttpClient()
    sign_in(browser, server, subject="alice")
    response = browser.post("/connections/", {"action": "disconnect", "server": "crm", "client": bobs.pk})
    assert response.status_code == 400
    assert UpstreamSession.objects.filter(client=bobs, revoked_at__isnull=True).exists()


def test_disconnect_needs_a_sign_in_and_a_csrf_token(server):
    claude, _ = connect(server, subject="alice", name="Claude")
    anonymous = HttpClient()
    response = anonymous.post("/connections/", {"action": "disconnect", "server": "crm", "client": claude.pk})
    assert response.status_code == 400
    strict = HttpClient(enforce_csrf_checks=True)
    response = strict.post("/connections/", {"action": "signin", "server": "crm"})
    assert response.status_code == 403  # no CSRF token
    assert UpstreamSession.objects.filter(client=claude, revoked_at__isnull=True).exists()


def test_the_consent_page_links_to_my_connections(server):
    from tests.flows.helpers import start_authorization

    client = make_client(server, name="Claude")
    browser = HttpClient()
    consent_url = start_authorization(browser, server, client)
    assert 'href="/connections/"' in browser.get(consent_url).content.decode()


@pytest.mark.parametrize("nonce", ["login", "another-login"], ids=["this-login", "another-login"])
def test_a_sign_in_id_token_must_carry_this_logins_nonce(server, nonce):
    """As for a client's login (issue 13): an ID token replayed from another login signs nobody in."""
    connect(server, subject="alice", name="Alice's Claude")
    browser = HttpClient()
    response = browser.post("/connections/", {"action": "signin", "server": server.slug})
    state = query_of(response["Location"])["state"]
    claims = {"sub": "alice", "aud": server.client_id, "iat": 1, "exp": 4_000_000_000,
              "nonce": upstream_nonce(state) if nonce == "login" else nonce}
    id_token = jwt.encode(claims, secrets.token_hex(32), algorithm="HS256")  # no issuer set: signature unchecked
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response(id_token=id_token))
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        back = browser.get(f"/oauth/{server.slug}/callback", {"state": state, "code": "c-1"})
    if nonce == "login":
        assert back.status_code == 302 and "Alice&#x27;s Claude" in page(browser)
    else:
        assert back.status_code == 400 and CONNECTIONS_COOKIE not in browser.cookies
        assert "Alice&#x27;s Claude" not in page(browser)
