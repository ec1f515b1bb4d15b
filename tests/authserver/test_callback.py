"""GET /oauth/<slug>/callback: the upstream leg, the proxy code, and every way it can fail (DESIGN §4,
§5.1, §5.2, §5.7)."""

import base64
import hashlib
import logging
from datetime import timedelta
from urllib.parse import unquote

import pytest
import requests
import responses
from django.db import connection
from django.test import Client as HttpClient
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oauthproxy.authserver.views.authorize import BROWSER_COOKIE
from oauthproxy.models import AuditEvent, Client, Grant, PendingAuthorization, UpstreamSession
from oauthproxy.upstream.client import upstream_nonce
from tests.conftest import make_server
from tests.factories import run_in_threads
from tests.flows.helpers import (
    DEFAULT_CODE_VERIFIER,
    DEFAULT_REDIRECT_URI,
    DEFAULT_STATE,
    UPSTREAM_CODE,
    SigningKey,
    authorization_flow,
    callback,
    form_body,
    id_token_claims,
    make_client,
    mock_oidc_discovery,
    pkce_pair,
    query_of,
    start_authorization,
    upstream_redirect,
    upstream_token_response,
)

ISSUER = "https://proxy.example.test/oauth/crm"
RESOURCE = "https://proxy.example.test/mcp/crm"
UPSTREAM_SECRET = "upstream-secret-value-123"


def begin(browser, server, mcp_client, **kwargs) -> str:
    """Authorize and approve; answer the upstream state the proxy created."""
    return query_of(upstream_redirect(browser, server, mcp_client, **kwargs))["state"]


def assert_client_error(response, error: str, *, state: str = DEFAULT_STATE) -> dict:
    assert response.status_code == 302, response.content[:500]
    assert response["Location"].startswith(DEFAULT_REDIRECT_URI + "?")
    params = query_of(response["Location"])
    assert params["error"] == error
    assert params["state"] == state
    assert params["iss"] == ISSUER
    assert "code" not in params
    return params


def assert_nothing_issued():
    assert not Grant.objects.exists()
    assert not UpstreamSession.objects.exists()


def failure_event() -> AuditEvent:
    return AuditEvent.objects.get(kind=AuditEvent.Kind.UPSTREAM_FAILURE)


def token_calls(upstream, server):
    return [call for call in upstream.calls if call.request.url == server.token_endpoint]


@pytest.mark.django_db
class TestSuccess:
    def test_full_flow_with_client_secret_basic(self, browser, db):
        server = make_server(client_id="proxy client:1", client_secret="s3cr%t/+&=é")
        mcp_client = make_client(server)
        result = authorization_flow(browser, server, mcp_client)
        request = result.upstream_token_request
        # RFC 6749 §2.3.1: form-urlencode id and secret before base64; client_id is not repeated in the body
        scheme, encoded = request.headers["Authorization"].split(" ")
        assert scheme == "Basic"
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        assert user == "proxy%20client%3A1" and unquote(user) == "proxy client:1"
        assert unquote(password) == "s3cr%t/+&=é" and "%" in password and "/" not in password
        body = form_body(request)
        assert "client_id" not in body and "client_secret" not in body
        assert body["grant_type"] == "authorization_code"
        assert body["code"] == UPSTREAM_CODE
        assert body["redirect_uri"] == "https://proxy.example.test/oauth/crm/callback"
        # the proxy's upstream PKCE verifier matches the challenge it sent upstream
        assert pkce_pair(body["code_verifier"])[1] == query_of(result.upstream_url)["code_challenge"]
        assert "resource" not in body

    def test_full_flow_with_client_secret_post(self, browser, db):
        server = make_server(token_endpoint_auth_methods_supported=["client_secret_post"])
        result = authorization_flow(browser, server, make_client(server))
        request = result.upstream_token_request
        assert "Authorization" not in request.headers
        body = form_body(request)
        assert body["client_id"] == "proxy-client" and body["client_secret"] == UPSTREAM_SECRET

    def test_without_upstream_pkce_no_verifier_is_sent(self, browser, db):
        server = make_server(use_pkce=False)
        result = authorization_flow(browser, server, make_client(server))
        assert "code_verifier" not in form_body(result.upstream_token_request)

    def test_client_gets_a_code_with_its_state_and_iss(self, browser, server, mcp_client):
        result = authorization_flow(browser, server, mcp_client)
        assert result.location.startswith(DEFAULT_REDIRECT_URI + "?")
        params = query_of(result.location)
        assert set(params) == {"code", "state", "iss"}
        assert params["state"] == DEFAULT_STATE and params["iss"] == ISSUER
        assert len(result.code) >= 43

    def test_grant_is_bound_and_stored_as_a_hash(self, browser, server, mcp_client):
        before = timezone.now()
        result = authorization_flow(browser, server, mcp_client, scope="openid email", resource=RESOURCE)
        grant = Grant.objects.get()
        assert grant.code == hashlib.sha256(result.code.encode()).hexdigest()
        assert grant.application == mcp_client and grant.user is None
        assert grant.redirect_uri == DEFAULT_REDIRECT_URI
        assert grant.scope == "openid email"
        assert grant.code_challenge == pkce_pair(DEFAULT_CODE_VERIFIER)[1]
        assert grant.code_challenge_method == "S256"
        assert grant.resource == [RESOURCE]
        assert before + timedelta(seconds=55) <= grant.expires <= timezone.now() + timedelta(seconds=60)
        session = grant.upstream_session
        assert session.client == mcp_client and session.server == server
        assert session.access_token == result.upstream_tokens["access_token"]
        assert session.refresh_token == result.upstream_tokens["refresh_token"]
        assert session.subject_source == "opaque" and session.subject.startswith("grant:")
        assert PendingAuthorization.objects.get().consumed_at is not None

    def test_resource_is_bound_even_when_the_client_sent_none(self, browser, server, mcp_client):
        authorization_flow(browser, server, mcp_client)
        assert Grant.objects.get().resource == [RESOURCE]

    def test_database_holds_no_usable_code_or_upstream_token(self, browser, server, mcp_client):
        result = authorization_flow(browser, server, mcp_client)
        with connection.cursor() as cursor:
            dump = ""
            for table in ("oauthproxy_grant", "oauthproxy_upstreamsession", "oauthproxy_pendingauthorization",
                          "oauthproxy_auditevent"):
                cursor.execute(f"SELECT * FROM {table}")  # noqa: S608
                dump += repr(cursor.fetchall())
        assert result.code not in dump
        assert result.upstream_tokens["access_token"] not in dump
        assert result.upstream_tokens["refresh_token"] not in dump
        assert query_of(result.upstream_url)["state"] not in dump

    def test_private_use_scheme_redirect(self, browser, server):
        mcp_client = make_client(server, redirect_uris=["com.example.app:/oauth/cb"])
        result = authorization_flow(browser, server, mcp_client, redirect_uri="com.example.app:/oauth/cb")
        assert result.location.startswith("com.example.app:/oauth/cb?code=")

    def test_loopback_port_chosen_at_run_time(self, browser, server, mcp_client):
        result = authorization_flow(browser, server, mcp_client, redirect_uri="http://127.0.0.1:51234/callback")
        assert result.location.startswith("http://127.0.0.1:51234/callback?code=")
        assert Grant.objects.get().redirect_uri == "http://127.0.0.1:51234/callback"

    def test_confidential_client(self, browser, server):
        mcp_client = make_client(server, public=False)
        assert authorization_flow(browser, server, mcp_client).code


@pytest.mark.django_db
class TestSubject:
    def test_from_a_verified_id_token(self, browser, upstream, db):
        server = make_server(issuer="https://idp.example.com")
        key = SigningKey()
        mock_oidc_discovery(upstream, server, key)
        state = begin(browser, server, make_client(server))
        claims = id_token_claims(server, sub="alice-0001", nonce=upstream_nonce(state))  # the login's nonce
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response(id_token=key.sign(claims)))
        response = callback(browser, server, state=state)
        assert "code" in query_of(response["Location"])
        session = UpstreamSession.objects.get()
        assert (session.subject, session.subject_source) == ("alice-0001", "id_token")

    @pytest.mark.parametrize("nonce", [None, "another-login"], ids=["missing", "another"])
    def test_an_id_token_without_this_logins_nonce_is_refused(self, browser, upstream, db, nonce):
        """Issue 13, finding 10: an ID token issued for another login (replayed) is not a login here."""
        server = make_server(issuer="https://idp.example.com")
        key = SigningKey()
        mock_oidc_discovery(upstream, server, key)
        state = begin(browser, server, make_client(server))
        claims = id_token_claims(server, sub="alice-0001", nonce=nonce)
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response(id_token=key.sign(claims)))
        response = callback(browser, server, state=state)
        assert_client_error(response, "server_error")
        assert "nonce" in failure_event().message
        assert_nothing_issued()

    def test_from_userinfo(self, browser, upstream, db):
        server = make_server(userinfo_endpoint="https://idp.example.com/userinfo")
        tokens = upstream_token_response()
        upstream.add(responses.POST, server.token_endpoint, json=tokens)
        upstream.add(responses.GET, server.userinfo_endpoint, json={"id": 4242, "login": "octocat"})
        state = begin(browser, server, make_client(server))
        response = callback(browser, server, state=state)
        assert "code" in query_of(response["Location"])
        session = UpstreamSession.objects.get()
        assert (session.subject, session.subject_source) == ("4242", "userinfo")
        userinfo_call = next(call for call in upstream.calls if call.request.url == server.userinfo_endpoint)
        assert userinfo_call.request.headers["Authorization"] == f"Bearer {tokens['access_token']}"

    def test_opaque_otherwise(self, browser, server, mcp_client):
        authorization_flow(browser, server, mcp_client)
        first = UpstreamSession.objects.get()
        authorization_flow(browser, server, mcp_client)
        second = UpstreamSession.objects.exclude(pk=first.pk).get()
        assert first.subject_source == second.subject_source == "opaque"
        assert first.subject != second.subject  # per grant, never shared


@pytest.mark.django_db
class TestStateChecks:
    def test_replay_is_refused(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        state = begin(browser, server, mcp_client)
        assert "code" in query_of(callback(browser, server, state=state)["Location"])
        replay = callback(browser, server, state=state, code="another-upstream-code")
        assert replay.status_code == 400
        assert "Location" not in replay
        assert "already" in replay.content.decode()
        assert Grant.objects.count() == 1
        assert len(token_calls(upstream, server)) == 1

    def test_unknown_state(self, browser, server, mcp_client, upstream):
        begin(browser, server, mcp_client)
        response = callback(browser, server, state="made-up-state")
        assert response.status_code == 400 and "Location" not in response
        assert not upstream.calls
        assert PendingAuthorization.objects.get().consumed_at is None

    def test_missing_state(self, browser, server, mcp_client):
        begin(browser, server, mcp_client)
        response = browser.get("/oauth/crm/callback", {"code": "x"})
        assert response.status_code == 400 and "Location" not in response

    def test_expired_state_tells_the_client(self, browser, server, mcp_client, upstream):
        state = begin(browser, server, mcp_client)
        PendingAuthorization.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
        response = callback(browser, server, state=state)
        assert_client_error(response, "access_denied")
        assert not upstream.calls
        assert_nothing_issued()
        # and it is used up
        assert callback(browser, server, state=state).status_code == 400

    def test_another_browser_is_refused_and_cannot_burn_the_state(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        state = begin(browser, server, mcp_client)
        attacker = HttpClient()
        response = callback(attacker, server, state=state)
        assert response.status_code == 403 and "Location" not in response
        assert "different browser" in response.content.decode()
        other_key = HttpClient()
        other_key.cookies[BROWSER_COOKIE] = "A" * 43
        assert callback(other_key, server, state=state).status_code == 403
        assert not upstream.calls
        assert_nothing_issued()
        # the browser that approved still completes
        assert "code" in query_of(callback(browser, server, state=state)["Location"])

    def test_state_of_another_server(self, browser, server, mcp_client, upstream):
        make_server(slug="wiki", name="Wiki")
        state = begin(browser, server, mcp_client)
        response = browser.get("/oauth/wiki/callback", {"state": state, "code": "x"})
        assert response.status_code == 400 and "Location" not in response
        assert not upstream.calls
        assert PendingAuthorization.objects.get().consumed_at is None

    def test_consent_not_given_means_no_state(self, browser, server, mcp_client):
        # before approval there is no upstream state at all: nothing to guess
        start_authorization(browser, server, mcp_client)
        assert PendingAuthorization.objects.get().state_checksum is None

    def test_client_disabled_during_login(self, browser, server, mcp_client, upstream):
        state = begin(browser, server, mcp_client)
        Client.objects.filter(pk=mcp_client.pk).update(disabled=True)
        assert_client_error(callback(browser, server, state=state), "unauthorized_client")
        assert not upstream.calls
        assert_nothing_issued()


@pytest.mark.postgres  # concurrent writers
@pytest.mark.django_db(transaction=True)
def test_concurrent_callbacks_with_one_state_complete_once(server):
    mcp_client = make_client(server)
    browser = HttpClient()
    state = begin(browser, server, mcp_client)
    cookie = browser.cookies[BROWSER_COOKIE].value
    workers = 6

    def run(_i):
        http = HttpClient()
        http.cookies[BROWSER_COOKIE] = cookie
        response = callback(http, server, state=state)
        return response.status_code if response.status_code != 302 or "code=" in response["Location"] else -1

    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        results = run_in_threads(workers, run)
        assert len(token_calls(upstream, server)) == 1
    assert sorted(results) == [302] + [400] * (workers - 1)
    assert Grant.objects.count() == 1
    assert UpstreamSession.objects.count() == 1


@pytest.mark.django_db
class TestUpstreamErrors:
    """Every upstream failure: an OAuth error redirect with the client's state, the reason in the audit
    log, and nothing half-written."""

    def test_upstream_access_denied(self, browser, server, mcp_client, upstream):
        state = begin(browser, server, mcp_client)
        response = callback(
            browser, server, state=state, code=None, error="access_denied", error_description="User said no"
        )
        assert_client_error(response, "access_denied")
        event = failure_event()
        assert event.detail["upstream_error"] == "access_denied"
        assert event.detail["upstream_error_description"] == "User said no"
        assert "access_denied" in event.message
        assert event.client == mcp_client
        assert not upstream.calls
        assert_nothing_issued()

    @pytest.mark.parametrize(
        ("upstream_error", "client_error"),
        [("invalid_scope", "server_error"), ("server_error", "server_error"),
         ("temporarily_unavailable", "temporarily_unavailable"), ("<script>", "server_error")],
    )
    def test_other_upstream_errors(self, browser, server, mcp_client, upstream, upstream_error, client_error):
        state = begin(browser, server, mcp_client)
        response = callback(browser, server, state=state, code=None, error=upstream_error)
        assert_client_error(response, client_error)
        assert failure_event().detail["upstream_error"] == upstream_error
        assert_nothing_issued()

    def test_upstream_500(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, status=500, body="oops")
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "temporarily_unavailable")
        assert "HTTP 500" in failure_event().message
        assert_nothing_issued()

    @pytest.mark.parametrize(
        ("exc", "reason"),
        [(requests.Timeout("read timed out"), "timed out"),
         (requests.ConnectionError("refused"), "cannot connect")],
    )
    def test_upstream_unreachable(self, browser, server, mcp_client, upstream, exc, reason):
        upstream.add(responses.POST, server.token_endpoint, body=exc)
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "temporarily_unavailable")
        assert reason in failure_event().message
        assert_nothing_issued()

    def test_non_json_answer(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, body="<html>login</html>", content_type="text/html")
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "server_error")
        assert "non-JSON" in failure_event().message
        assert_nothing_issued()

    def test_missing_access_token(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, json={"token_type": "Bearer"})
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "server_error")
        assert "no access_token" in failure_event().message
        assert_nothing_issued()

    def test_upstream_refuses_the_code(self, browser, server, mcp_client, upstream):
        upstream.add(
            responses.POST, server.token_endpoint, status=400,
            json={"error": "invalid_grant", "error_description": "code expired"},
        )
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "server_error")
        event = failure_event()
        assert "invalid_grant" in event.message and "code expired" in event.message
        assert event.detail["upstream_error"] == "invalid_grant"
        assert_nothing_issued()

    def test_bad_id_token_without_issuer(self, browser, server, mcp_client, upstream):
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response(id_token="not.a.jwt"))
        response = callback(browser, server, state=begin(browser, server, mcp_client))
        assert_client_error(response, "server_error")
        assert "id_token rejected" in failure_event().message
        assert_nothing_issued()

    @pytest.mark.parametrize(
        "problem", ["wrong key", "wrong audience", "wrong issuer", "expired", "no sub"]
    )
    def test_bad_id_token_with_issuer(self, browser, upstream, db, problem):
        server = make_server(issuer="https://idp.example.com", revocation_endpoint="https://idp.example.com/revoke")
        key = SigningKey(kid="k1")
        mock_oidc_discovery(upstream, server, key)
        claims = id_token_claims(server)
        signer = key
        if problem == "wrong key":
            signer = SigningKey(kid="k1")
        elif problem == "wrong audience":
            claims["aud"] = "someone-else"
        elif problem == "wrong issuer":
            claims["iss"] = "https://evil.example"
        elif problem == "expired":
            claims["exp"] = claims["iat"] - 3600
        else:
            del claims["sub"]
        tokens = upstream_token_response(id_token=signer.sign(claims))
        upstream.add(responses.POST, server.token_endpoint, json=tokens)
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        response = callback(browser, server, state=begin(browser, server, make_client(server)))
        assert_client_error(response, "server_error")
        assert "id_token" in failure_event().message
        assert_nothing_issued()
        # the upstream tokens the proxy will not keep are revoked at the upstream
        revoked = [form_body(c.request)["token"] for c in upstream.calls if c.request.url == server.revocation_endpoint]
        assert set(revoked) == {tokens["access_token"], tokens["refresh_token"]}

    def test_userinfo_failure(self, browser, upstream, db):
        server = make_server(userinfo_endpoint="https://idp.example.com/userinfo")
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        upstream.add(responses.GET, server.userinfo_endpoint, status=401)
        response = callback(browser, server, state=begin(browser, server, make_client(server)))
        assert_client_error(response, "server_error")
        assert "userinfo" in failure_event().message
        assert_nothing_issued()

    def test_callback_without_code(self, browser, server, mcp_client, upstream):
        response = callback(browser, server, state=begin(browser, server, mcp_client), code=None)
        assert_client_error(response, "server_error")
        assert "without a usable code" in failure_event().message
        assert not upstream.calls

    def test_mix_up_defence_with_rfc9207_iss(self, browser, upstream, db):
        server = make_server(issuer="https://idp.example.com")
        response = callback(
            browser, server, state=begin(browser, server, make_client(server)), iss="https://evil.example"
        )
        assert_client_error(response, "server_error")
        assert "not the configured issuer" in failure_event().message
        assert not upstream.calls

    def test_matching_iss_is_accepted(self, browser, upstream, db):
        server = make_server(issuer="https://idp.example.com/")
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        response = callback(
            browser, server, state=begin(browser, server, make_client(server)), iss="https://idp.example.com"
        )
        assert "code" in query_of(response["Location"])


@pytest.mark.django_db
def test_no_secret_or_token_in_pages_or_logs(browser, server, mcp_client, caplog):
    caplog.set_level(logging.DEBUG)
    result = authorization_flow(browser, server, mcp_client)
    upstream_state = query_of(result.upstream_url)["state"]
    secrets_seen = [
        result.code,
        result.upstream_tokens["access_token"],
        result.upstream_tokens["refresh_token"],
        upstream_state,
        UPSTREAM_SECRET,
        UPSTREAM_CODE,
        PendingAuthorization.objects.get().upstream_code_verifier,
        browser.cookies[BROWSER_COOKIE].value,
    ]
    # a replay (error page) and a failing flow (audit log) too
    page = callback(browser, server, state=upstream_state).content.decode()
    with responses.RequestsMock() as upstream:
        upstream.add(responses.POST, server.token_endpoint, status=400, json={"error": "invalid_grant"})
        second_state = begin(browser, server, mcp_client)
        failed = callback(browser, server, state=second_state)
    assert query_of(failed["Location"])["error"] == "server_error"
    secrets_seen.append(second_state)
    messages = caplog.text + "".join(e.message + repr(e.detail) for e in AuditEvent.objects.all())
    assert messages  # something was logged
    for value in secrets_seen:
        assert value not in page
        assert value not in messages


_fuzz_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60) | st.sampled_from(
    ["", "\x00", "access_denied", "https://idp.example.com", "a" * 5000]
)


@pytest.mark.django_db
@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.dictionaries(
        st.sampled_from(["state", "code", "error", "error_description", "iss", "session_state"]),
        st.lists(_fuzz_text, min_size=1, max_size=2),
        max_size=5,
    ),
    use_real_state=st.booleans(),
)
def test_fuzzed_callbacks_never_fail_with_5xx(server, mcp_client, params, use_real_state):
    browser = HttpClient()
    state = begin(browser, server, mcp_client)
    if use_real_state:
        params = {**params, "state": [state]}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.add(responses.POST, server.token_endpoint, json=upstream_token_response())
        response = browser.get("/oauth/crm/callback", params)
    assert response.status_code < 500
    if response.status_code == 302:
        assert response["Location"].startswith(DEFAULT_REDIRECT_URI + "?")


@pytest.mark.django_db
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(["request", "decision", "remember"]), _fuzz_text, max_size=3))
def test_fuzzed_consent_answers_never_fail_with_5xx(server, mcp_client, data):
    browser = HttpClient()
    start_authorization(browser, server, mcp_client)
    assert browser.post("/oauth/crm/consent", data).status_code < 500
    assert browser.get("/oauth/crm/consent", data).status_code < 500


@pytest.mark.django_db
@pytest.mark.parametrize("public", [True, False])
def test_the_code_is_redeemable_at_the_token_endpoint(browser, server, public):
    """The contract with the token area: the code this flow issues (stored as its SHA-256, bound to client,
    redirect URI, PKCE and resource) redeems for proxy tokens."""
    from tests.factories import redeem_code

    mcp_client = make_client(server, public=public)
    result = authorization_flow(browser, server, mcp_client, resource=RESOURCE)
    response = redeem_code(
        HttpClient(), server, mcp_client, result.code, redirect_uri=result.redirect_uri,
        code_verifier=result.code_verifier, resource=RESOURCE,
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["access_token"] and body["refresh_token"]
    assert result.upstream_tokens["access_token"] not in response.content.decode()
