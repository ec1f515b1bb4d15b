""""Try it" on a server's admin page: the admin runs the real upstream login in their browser and sees the
outcome (subject, scopes, expiry, refresh token; never a token), and nothing is left behind.

The upstream is mocked at the HTTP boundary (``responses``); the flow runs through the real admin views
and the server's real callback.
"""

import base64
import json
import logging
from datetime import timedelta
from urllib.parse import unquote

import pytest
import responses
from django.contrib.auth.models import Group, Permission, User
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client as HttpClient
from django.utils import timezone

from oauthproxy.authserver.views.authorize import BROWSER_COOKIE
from oauthproxy.authserver.views.callback import TRY_IT_COOKIE
from oauthproxy.core.crypto import token_checksum
from oauthproxy.models import AccessToken, AuditEvent, Grant, PendingAuthorization, RefreshToken, UpstreamSession
from oauthproxy.upstream.client import upstream_nonce
from tests.conftest import UPSTREAM, make_server
from tests.flows.helpers import (
    SigningKey,
    form_body,
    id_token_claims,
    mock_oidc_discovery,
    pkce_pair,
    query_of,
    upstream_token_response,
)

ADMIN = "/admin/oauthproxy/mcpserver"
SECRET = "upstream-secret-value-123"
CODE = "upstream-code-for-the-test"


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def teams(db):
    call_command("team_create", "team-a", verbosity=0)
    call_command("team_create", "team-b", verbosity=0)
    return Group.objects.get(name="team-a"), Group.objects.get(name="team-b")


@pytest.fixture
def server(teams):
    return make_server(
        slug="crm",
        team=teams[0],
        userinfo_endpoint=f"{UPSTREAM}/userinfo",
        revocation_endpoint=f"{UPSTREAM}/revoke",
    )


@pytest.fixture
def other_server(teams):
    return make_server(slug="theirs", name="Their server", team=teams[1])


def _login(username: str, team) -> HttpClient:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.groups.add(team)
    browser = HttpClient()
    browser.force_login(user)
    browser.user = user
    return browser


@pytest.fixture
def member(teams) -> HttpClient:
    return _login("alice", teams[0])


def start(browser: HttpClient, server) -> dict:
    """Press the button; answer the upstream authorization request's parameters."""
    response = browser.post(f"{ADMIN}/{server.pk}/try-it/")
    assert response.status_code == 302, response.content.decode()[:2000]
    location = response["Location"]
    assert location.startswith(server.authorization_endpoint + "?")
    return query_of(location)


def come_back(browser: HttpClient, server, **params):
    """The upstream redirecting the admin's browser back to the server's real callback."""
    return browser.get(f"/oauth/{server.slug}/callback", params)


def mock_tokens(upstream, server, **overrides) -> dict:
    body = upstream_token_response(**overrides)
    upstream.add(responses.POST, server.token_endpoint, json=body)
    upstream.add(responses.GET, server.userinfo_endpoint, json={"sub": "alice@example.com", "email": "a@x"})
    upstream.add(responses.POST, server.revocation_endpoint, status=200)
    return body


def assert_nothing_stored():
    assert UpstreamSession.objects.count() == 0
    assert Grant.objects.count() == 0
    assert AccessToken.objects.count() == 0
    assert RefreshToken.objects.count() == 0


@pytest.mark.django_db
class TestStart:
    def test_the_server_page_has_the_button_and_the_page_explains_the_test(self, member, server):
        change = member.get(f"{ADMIN}/{server.pk}/change/").content.decode()
        assert f"{ADMIN}/{server.pk}/try-it/" in change and "Try it" in change
        page = member.get(f"{ADMIN}/{server.pk}/try-it/")
        assert page.status_code == 200
        body = page.content.decode()
        assert server.callback_url in body and "client_secret_basic" in body
        assert 'method="post"' in body and PendingAuthorization.objects.count() == 0  # GET starts nothing

    def test_it_starts_a_real_upstream_authorization_bound_to_this_browser_and_admin(self, member, server):
        params = start(member, server)
        assert params["response_type"] == "code"
        assert params["client_id"] == server.client_id
        assert params["redirect_uri"] == f"https://proxy.example.test/oauth/{server.slug}/callback"
        assert params["scope"] == "openid email offline_access"
        assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) == 43
        pending = PendingAuthorization.objects.get()
        assert pending.tester == member.user and pending.client is None and pending.is_try_it
        assert pending.state_checksum == token_checksum(params["state"])  # the state itself is not stored
        assert pending.approved_at is not None and pending.consumed_at is None
        assert pending.expires_at <= timezone.now() + timedelta(seconds=601)
        assert pkce_pair(pending.upstream_code_verifier)[1] == params["code_challenge"]
        cookie = member.cookies[TRY_IT_COOKIE]
        assert cookie["path"] == f"/oauth/{server.slug}/callback" and cookie["httponly"]
        assert pending.browser_key_checksum == token_checksum(cookie.value)
        # the admin's own MCP-login browser key is left alone
        assert BROWSER_COOKIE not in member.cookies

    def test_a_disabled_server_cannot_be_tried(self, member, server):
        server.enabled = False
        server.save()
        response = member.post(f"{ADMIN}/{server.pk}/try-it/", follow=True)
        assert response.status_code == 200 and "disabled" in response.content.decode()
        assert PendingAuthorization.objects.count() == 0

    def test_only_post_starts_it_and_csrf_is_enforced(self, teams, server):
        user = User.objects.create_user("carol", password="pw", is_staff=True)
        user.groups.add(teams[0])
        browser = HttpClient(enforce_csrf_checks=True)
        browser.force_login(user)
        assert browser.post(f"{ADMIN}/{server.pk}/try-it/").status_code == 403
        assert PendingAuthorization.objects.count() == 0


@pytest.mark.django_db
class TestOutcome:
    def test_success_shows_subject_scopes_expiry_and_never_a_token(self, member, server, upstream, caplog):
        caplog.set_level(logging.DEBUG)
        params = start(member, server)
        tokens = mock_tokens(upstream, server, scope="openid email")
        response = come_back(member, server, state=params["state"], code=CODE)
        assert response["Location"].startswith(f"{ADMIN}/{server.pk}/try-it/")
        page = member.get(response["Location"]).content.decode()

        assert "Success" in page
        assert "alice@example.com" in page and "userinfo endpoint" in page
        assert "<code>openid email</code>" in page  # granted scopes
        assert "3600 seconds" in page
        assert "Refresh token issued</th><td>yes" in page
        assert "ID token present</th><td>no" in page
        assert "client_secret_basic" in page and "revoked at the upstream" in page
        # the code exchange: the configured auth method, the real callback, the PKCE verifier
        token_call = next(c.request for c in upstream.calls if c.request.url == server.token_endpoint)
        form = form_body(token_call)
        pending = PendingAuthorization.objects.get()
        assert form["code"] == CODE and form["code_verifier"] == pending.upstream_code_verifier
        assert form["redirect_uri"] == server.callback_url and "client_secret" not in form
        basic = base64.b64decode(token_call.headers["Authorization"].split()[1]).decode()
        assert unquote(basic.split(":", 1)[1]) == SECRET
        # both upstream tokens revoked, nothing stored
        revoked = {form_body(c.request)["token"] for c in upstream.calls if c.request.url == server.revocation_endpoint}
        assert revoked == {tokens["access_token"], tokens["refresh_token"]}
        assert_nothing_stored()
        # audited, actor = the admin, no token anywhere
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_TRY_IT)
        assert event.actor == member.user and event.server == server and event.subject == "alice@example.com"
        assert event.detail["ok"] is True and event.detail["expires_in"] == 3600
        logs = "\n".join(r.getMessage() for r in caplog.records)
        for token in (tokens["access_token"], tokens["refresh_token"], CODE, SECRET):
            assert token not in page and token not in json.dumps(event.detail) and token not in event.message
            assert token not in logs
        assert pending.upstream_code_verifier not in page

    def test_id_token_subject_and_no_refresh_token(self, member, teams, upstream):
        server = make_server(slug="oidc", team=teams[0], issuer=UPSTREAM, scopes=["openid"])
        key = SigningKey()
        mock_oidc_discovery(upstream, server, key)
        params = start(member, server)
        id_token = key.sign(id_token_claims(server, sub="user-42", nonce=upstream_nonce(params["state"])))
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response(
            id_token=id_token, refresh_token=None, expires_in=None, scope=None))
        page = member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]).content.decode()
        assert "Success" in page and "user-42" in page and "ID token's <code>sub</code>" in page
        assert "Refresh token issued</th><td>no" in page and "ID token present</th><td>yes" in page
        assert "Not stated (no <code>expires_in</code>)" in page
        assert "Not stated by the upstream (requested: <code>openid</code>)" in page
        assert "no revocation endpoint" in page
        assert id_token not in page
        assert_nothing_stored()

    def test_upstream_denial_is_shown_with_the_upstreams_reason(self, member, server, upstream):
        params = start(member, server)
        response = come_back(member, server, state=params["state"], error="access_denied",
                             error_description="The user <b>cancelled</b>")
        page = member.get(response["Location"]).content.decode()
        assert "Failed" in page and "at authorization" in page
        assert "access_denied" in page and "The user &lt;b&gt;cancelled&lt;/b&gt;" in page  # escaped
        assert len(upstream.calls) == 0  # no exchange
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_TRY_IT)
        assert event.detail["ok"] is False and event.detail["upstream_error"] == "access_denied"
        assert event.actor == member.user
        assert_nothing_stored()

    def test_token_endpoint_failure_is_shown_with_the_upstreams_reason(self, member, server, upstream):
        params = start(member, server)
        upstream.add(responses.POST, server.token_endpoint, status=401,
                     json={"error": "invalid_client", "error_description": "client authentication failed"})
        page = member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]).content.decode()
        assert "Failed" in page and "at code exchange" in page
        assert "invalid_client" in page and "client authentication failed" in page
        assert "Tokens issued</th><td>no" in page
        assert_nothing_stored()

    def test_token_endpoint_down_is_shown_plainly(self, member, server, upstream):
        params = start(member, server)
        upstream.add(responses.POST, server.token_endpoint, status=503, body="down")
        page = member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]).content.decode()
        assert "Failed" in page and "HTTP 503" in page

    def test_tokens_without_a_learnable_subject_are_still_revoked(self, member, server, upstream):
        params = start(member, server)
        tokens = upstream_token_response()
        upstream.add(responses.POST, server.token_endpoint, json=tokens)
        upstream.add(responses.GET, server.userinfo_endpoint, status=500)
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        page = member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]).content.decode()
        assert "Failed" in page and "subject could not be learnt" in page and "userinfo: HTTP 500" in page
        assert "3600 seconds" in page  # what the token response said is still shown
        assert len([c for c in upstream.calls if c.request.url == server.revocation_endpoint]) == 2
        assert tokens["access_token"] not in page
        assert_nothing_stored()

    def test_an_expired_test_says_so(self, member, server, upstream):
        params = start(member, server)
        PendingAuthorization.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
        page = member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]).content.decode()
        assert "Failed" in page and "expired" in page
        assert len(upstream.calls) == 0


@pytest.mark.django_db
class TestBinding:
    def test_the_state_is_single_use(self, member, server, upstream):
        params = start(member, server)
        mock_tokens(upstream, server)
        assert come_back(member, server, state=params["state"], code=CODE).status_code == 302
        calls = len(upstream.calls)
        again = come_back(member, server, state=params["state"], code=CODE)
        assert again.status_code == 400 and "already completed" in again.content.decode()
        assert len(upstream.calls) == calls  # no second exchange
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_TRY_IT).count() == 1

    def test_another_browser_of_the_same_admin_cannot_complete_it(self, member, server, upstream):
        params = start(member, server)
        other = HttpClient()
        other.force_login(member.user)  # logged in, but without the test's cookie
        response = come_back(other, server, state=params["state"], code=CODE)
        assert response.status_code == 403 and "different browser" in response.content.decode()
        assert len(upstream.calls) == 0
        # the right browser still can
        mock_tokens(upstream, server)
        assert "Success" in member.get(come_back(member, server, state=params["state"], code=CODE)["Location"]
                                       ).content.decode()

    def test_another_admin_or_no_admin_cannot_complete_it(self, member, server, teams, upstream):
        params = start(member, server)
        for browser in (_login("bob", teams[0]), HttpClient()):
            browser.cookies[TRY_IT_COOKIE] = member.cookies[TRY_IT_COOKIE].value
            response = come_back(browser, server, state=params["state"], code=CODE)
            assert response.status_code == 403, response.content.decode()[:500]
        assert len(upstream.calls) == 0
        assert PendingAuthorization.objects.get().consumed_at is None

    def test_a_made_up_state_is_refused_as_a_page(self, member, server, upstream):
        start(member, server)
        response = come_back(member, server, state="made-up-state", code=CODE)
        assert response.status_code == 400 and len(upstream.calls) == 0


@pytest.mark.django_db
class TestTeamScoping:
    def test_another_teams_server_is_404(self, member, other_server, upstream):
        assert member.get(f"{ADMIN}/{other_server.pk}/try-it/").status_code == 404
        assert member.post(f"{ADMIN}/{other_server.pk}/try-it/").status_code == 404
        assert PendingAuthorization.objects.count() == 0

    def test_results_are_only_for_the_admin_who_ran_the_test(self, member, server, teams, upstream):
        params = start(member, server)
        mock_tokens(upstream, server)
        location = come_back(member, server, state=params["state"], code=CODE)["Location"]
        assert member.get(location).status_code == 200
        assert _login("bob", teams[0]).get(location).status_code == 404  # same team, not his test
        assert _login("mallory", teams[1]).get(location).status_code == 404  # another team
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_TRY_IT)
        # a result under another server's URL is not found either
        theirs = make_server(slug="mine-too", team=teams[0])
        assert member.get(f"{ADMIN}/{theirs.pk}/try-it/{event.pk}/").status_code == 404

    def test_a_team_member_without_change_permission_cannot_try(self, db):
        readers = Group.objects.create(name="readers")
        readers.permissions.add(Permission.objects.get(codename="view_mcpserver"))
        server = make_server(slug="read-only", team=readers)
        browser = _login("viewer", readers)
        assert browser.get(f"{ADMIN}/{server.pk}/change/").status_code == 200  # can see it
        assert browser.get(f"{ADMIN}/{server.pk}/try-it/").status_code == 403
        assert browser.post(f"{ADMIN}/{server.pk}/try-it/").status_code == 403
        assert PendingAuthorization.objects.count() == 0


@pytest.mark.django_db
def test_real_client_flows_are_unaffected_by_a_test_in_the_same_browser(member, server):
    """A test does not touch the browser key of real flows; a real flow's state never reaches the test."""
    from tests.flows.helpers import authorization_flow, make_client

    start(member, server)
    client = make_client(server)
    result = authorization_flow(member, server, client)
    assert result.code and UpstreamSession.objects.count() == 1
    assert PendingAuthorization.objects.filter(tester__isnull=False, consumed_at__isnull=True).count() == 1
