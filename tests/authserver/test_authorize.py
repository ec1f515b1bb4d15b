"""GET /oauth/<slug>/authorize (DESIGN §4, §5.3, §5.4, §5.12)."""

import hashlib
from urllib.parse import urlsplit

import pytest
from django.db import connection
from django.test import Client as HttpClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from oauthproxy.authserver.views.authorize import BROWSER_COOKIE
from oauthproxy.console.clients import client_delete, client_update
from oauthproxy.models import PendingAuthorization
from tests.conftest import make_server
from tests.flows.helpers import (
    DEFAULT_REDIRECT_URI,
    DEFAULT_STATE,
    authorize,
    authorize_params,
    make_client,
    pkce_pair,
    query_of,
)

ISSUER = "https://proxy.example.test/oauth/crm"
RESOURCE = "https://proxy.example.test/mcp/crm"


def assert_page(response, status: int, text: str = "") -> str:
    """An HTML error page, never a redirect (the redirect URI is not trusted)."""
    assert response.status_code == status, response.content[:500]
    assert "Location" not in response
    assert response["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert response["X-Frame-Options"] == "DENY"
    body = response.content.decode()
    assert text in body
    assert PendingAuthorization.objects.count() == 0
    return body


def assert_error_redirect(response, error: str, *, redirect_uri: str = DEFAULT_REDIRECT_URI, state=DEFAULT_STATE):
    assert response.status_code == 302, response.content[:500]
    location = response["Location"]
    assert location.startswith(redirect_uri + "?")
    params = query_of(location)
    assert params["error"] == error
    assert params["iss"] == ISSUER
    if state is None:
        assert "state" not in params
    else:
        assert params["state"] == state
    assert "code" not in params
    assert PendingAuthorization.objects.count() == 0
    return params


@pytest.mark.django_db
class TestBeforeTheRedirectUriIsTrusted:
    def test_unknown_server_is_a_404_page(self, browser, mcp_client):
        response = browser.get("/oauth/nope/authorize", authorize_params(mcp_client))
        assert_page(response, 404, "no MCP server")

    def test_disabled_server_is_a_404_page(self, browser, server, mcp_client):
        server.enabled = False
        server.save()
        assert_page(authorize(browser, server, mcp_client), 404)

    def test_unknown_client_is_a_page(self, browser, server, mcp_client):
        response = browser.get(
            "/oauth/crm/authorize", {**authorize_params(mcp_client), "client_id": "no-such-client"}
        )
        body = assert_page(response, 400, "not registered")
        assert "invalid_client" in body

    def test_missing_client_id_is_a_page(self, browser, server, mcp_client):
        params = authorize_params(mcp_client)
        del params["client_id"]
        assert_page(browser.get("/oauth/crm/authorize", params), 400, "no client_id")

    def test_client_of_another_server_is_unknown_here(self, browser, server, mcp_client):
        other = make_server(slug="wiki", name="Wiki")
        response = browser.get("/oauth/wiki/authorize", authorize_params(mcp_client))
        assert_page(response, 400, "not registered")
        # and it works at its own server
        assert authorize(browser, server, mcp_client).status_code == 302
        assert other.pk != server.pk

    def test_missing_redirect_uri_is_a_page(self, browser, server, mcp_client):
        params = authorize_params(mcp_client)
        del params["redirect_uri"]
        assert_page(browser.get("/oauth/crm/authorize", params), 400, "no redirect_uri")

    @pytest.mark.parametrize(
        "redirect_uri",
        [
            "https://evil.example/callback",
            "http://127.0.0.1:33418/callback/",
            "http://127.0.0.1:33418/callback?x=1",
            "http://127.0.0.1:33418/callback#frag",
            "http://attacker@127.0.0.1:33418/callback",
            "http://127.0.0.2:33418/callback",
            "javascript:alert(1)",
            "http://127.0.0.1:33418/CALLBACK",
            "http://[::1",
            "http://127.0.0.1:99999/callback",
            "http://127.0.0.1:-1/callback",
            "/callback",
        ],
    )
    def test_unregistered_redirect_uri_is_a_page_not_a_redirect(self, browser, server, mcp_client, redirect_uri):
        response = authorize(browser, server, mcp_client, redirect_uri=redirect_uri)
        assert_page(response, 400, "redirect_uri is not registered")

    def test_errors_after_an_untrusted_redirect_uri_are_still_pages(self, browser, server, mcp_client):
        response = authorize(
            browser, server, mcp_client, redirect_uri="https://evil.example/cb", code_challenge_method="plain"
        )
        assert_page(response, 400)

    def test_repeated_client_id_is_a_page(self, browser, server, mcp_client):
        query = f"client_id={mcp_client.client_id}&client_id=other&redirect_uri={DEFAULT_REDIRECT_URI}"
        assert_page(browser.get(f"/oauth/crm/authorize?{query}"), 400, "must not be repeated")

    def test_nul_in_client_id_is_a_page_not_a_500(self, browser, server, mcp_client):
        response = browser.get("/oauth/crm/authorize", {**authorize_params(mcp_client), "client_id": "a\x00b"})
        assert_page(response, 400)

    def test_overlong_client_id_is_unknown(self, browser, server, mcp_client):
        response = browser.get("/oauth/crm/authorize", {**authorize_params(mcp_client), "client_id": "x" * 5000})
        assert_page(response, 400, "not registered")

    def test_rate_limit_is_a_page_with_retry_after(self, browser, server, mcp_client, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"authorize:client": (2, 3600)}}
        statuses = [authorize(browser, server, mcp_client).status_code for _ in range(4)]
        assert statuses[:2] == [302, 302]
        limited = authorize(browser, server, mcp_client)
        assert limited.status_code == 429
        assert "Location" not in limited
        assert int(limited["Retry-After"]) > 0

    def test_rate_limit_is_per_client(self, browser, server, mcp_client, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"authorize:client": (1, 3600)}}
        other = make_client(server, name="Other")
        assert authorize(browser, server, mcp_client).status_code == 302
        assert authorize(browser, server, mcp_client).status_code == 429
        assert authorize(browser, server, other).status_code == 302

    def test_only_get(self, browser, server, mcp_client):
        assert browser.post("/oauth/crm/authorize", authorize_params(mcp_client)).status_code == 405


@pytest.mark.django_db
class TestErrorsRedirectedToTheClient:
    def test_unsupported_response_type(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, response_type="token")
        assert_error_redirect(response, "unsupported_response_type")

    def test_missing_response_type(self, browser, server, mcp_client):
        assert_error_redirect(authorize(browser, server, mcp_client, response_type=None), "invalid_request")

    def test_pkce_is_required(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, code_challenge=None, code_challenge_method=None)
        params = assert_error_redirect(response, "invalid_request")
        assert "PKCE" in params["error_description"]

    def test_plain_pkce_is_refused(self, browser, server, mcp_client):
        verifier = "v" * 50
        response = authorize(browser, server, mcp_client, code_challenge=verifier, code_challenge_method="plain")
        assert_error_redirect(response, "invalid_request")

    def test_missing_method_is_not_a_downgrade_to_plain(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, code_challenge_method=None)
        assert_error_redirect(response, "invalid_request")

    @pytest.mark.parametrize(
        "challenge", ["short", "a" * 42, "a" * 129, "a" * 42 + "=", "a" * 42 + "+", "a" * 42 + "/", "é" * 43]
    )
    def test_malformed_code_challenge(self, browser, server, mcp_client, challenge):
        response = authorize(browser, server, mcp_client, code_challenge=challenge)
        assert_error_redirect(response, "invalid_request")

    @pytest.mark.parametrize(
        "resource",
        [
            "https://proxy.example.test/mcp/crm/",
            "https://proxy.example.test/mcp/wiki",
            "https://upstream.example/api",
            "https://proxy.example.test/mcp/CRM",
        ],
    )
    def test_resource_must_be_this_server(self, browser, server, mcp_client, resource):
        assert_error_redirect(authorize(browser, server, mcp_client, resource=resource), "invalid_target")

    def test_invalid_scope_when_the_server_is_strict(self, browser, server, mcp_client):
        server.strict_scopes = True
        server.save()
        response = authorize(browser, server, mcp_client, scope="openid admin")
        assert_error_redirect(response, "invalid_scope")

    def test_disabled_client(self, browser, server, mcp_client):
        mcp_client.disabled = True
        mcp_client.save()
        assert_error_redirect(authorize(browser, server, mcp_client), "unauthorized_client")

    def test_repeated_parameter(self, browser, server, mcp_client):
        query = "&".join(f"{k}={v}" for k, v in authorize_params(mcp_client).items())
        response = browser.get(f"/oauth/crm/authorize?{query}&code_challenge_method=plain")
        assert_error_redirect(response, "invalid_request")

    def test_request_objects_are_not_supported(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, request="eyJhbGciOiJub25lIn0.e30.")
        assert_error_redirect(response, "request_not_supported")

    def test_only_query_response_mode(self, browser, server, mcp_client):
        assert_error_redirect(authorize(browser, server, mcp_client, response_mode="fragment"), "invalid_request")

    def test_error_without_state_has_no_state(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, state=None, response_type="token")
        assert_error_redirect(response, "unsupported_response_type", state=None)

    def test_state_with_control_characters(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, state="a\x00b")
        assert_error_redirect(response, "invalid_request", state=None)

    def test_registered_query_is_kept(self, browser, server):
        uri = "https://app.example.com/cb?tenant=7"
        mcp_client = make_client(server, redirect_uris=[uri])
        response = authorize(browser, server, mcp_client, redirect_uri=uri, response_type="token")
        location = response["Location"]
        assert location.startswith("https://app.example.com/cb?tenant=7&error=unsupported_response_type")

    def test_private_use_scheme_redirect(self, browser, server):
        uri = "com.example.app:/oauth/callback"
        mcp_client = make_client(server, redirect_uris=[uri])
        response = authorize(browser, server, mcp_client, redirect_uri=uri, code_challenge_method="plain")
        assert_error_redirect(response, "invalid_request", redirect_uri=uri)


@pytest.mark.django_db
class TestValidRequest:
    def test_goes_to_consent_not_upstream(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, resource=RESOURCE)
        assert response.status_code == 302
        location = response["Location"]
        assert location.startswith("/oauth/crm/consent?request=")
        assert "idp.example.com" not in location
        pending = PendingAuthorization.objects.get()
        assert str(pending.pk) == query_of(location)["request"]
        # no upstream state exists before consent (DESIGN §5.6)
        assert pending.state_checksum is None and pending.approved_at is None
        assert pending.client == mcp_client and pending.server == server
        assert pending.redirect_uri == DEFAULT_REDIRECT_URI
        assert pending.client_state == DEFAULT_STATE
        assert pending.code_challenge == pkce_pair("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")[1]
        assert pending.resource == RESOURCE
        assert "no-store" in response["Cache-Control"]

    def test_browser_cookie_is_http_only_lax_secure_and_stored_hashed(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client)
        cookie = response.cookies[BROWSER_COOKIE]
        assert cookie["httponly"] and cookie["secure"]
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/oauth/"
        key = cookie.value
        pending = PendingAuthorization.objects.get()
        assert pending.browser_key_checksum == hashlib.sha256(key.encode()).hexdigest()
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM oauthproxy_pendingauthorization")
            assert key not in repr(cursor.fetchall())

    def test_cookie_is_reused_by_the_same_browser(self, browser, server, mcp_client):
        first = authorize(browser, server, mcp_client).cookies[BROWSER_COOKIE].value
        second = authorize(browser, server, mcp_client)
        assert BROWSER_COOKIE not in second.cookies
        checksums = set(PendingAuthorization.objects.values_list("browser_key_checksum", flat=True))
        assert checksums == {hashlib.sha256(first.encode()).hexdigest()}

    def test_scope_defaults_to_all_server_scopes(self, browser, server, mcp_client):
        authorize(browser, server, mcp_client)
        assert PendingAuthorization.objects.get().scope == "openid email offline_access"

    def test_scope_subset(self, browser, server, mcp_client):
        authorize(browser, server, mcp_client, scope="email  openid email")
        assert PendingAuthorization.objects.get().scope == "email openid"

    def test_missing_state_is_accepted_as_empty(self, browser, server, mcp_client):
        assert authorize(browser, server, mcp_client, state=None).status_code == 302
        assert PendingAuthorization.objects.get().client_state == ""

    @pytest.mark.parametrize("port", ["", ":1", ":65535", ":33418"])
    def test_loopback_port_may_vary(self, browser, server, mcp_client, port):
        uri = f"http://127.0.0.1{port}/callback"
        response = authorize(browser, server, mcp_client, redirect_uri=uri)
        assert response.status_code == 302
        assert PendingAuthorization.objects.get().redirect_uri == uri

    def test_unknown_parameters_are_ignored(self, browser, server, mcp_client):
        response = authorize(browser, server, mcp_client, nonce="n", prompt="login", foo="bar")
        assert response.status_code == 302
        assert urlsplit(response["Location"]).path == "/oauth/crm/consent"


@pytest.mark.django_db
class TestClientChanges:
    """The client row is cached per process for a few seconds; changes made here apply at once."""

    def test_a_client_disabled_by_the_admin_is_refused_at_once(self, browser, server, mcp_client):
        assert authorize(browser, server, mcp_client).status_code == 302  # the client is cached now
        client_update(client=mcp_client, actor=None, disabled=True)
        response = authorize(browser, server, mcp_client)
        assert response.status_code == 302
        assert query_of(response["Location"])["error"] == "unauthorized_client"

    def test_a_removed_redirect_uri_is_refused_at_once(self, browser, server, mcp_client):
        assert authorize(browser, server, mcp_client).status_code == 302
        mcp_client.redirect_uris = "https://app.example/other-callback"
        mcp_client.save()  # as an RFC 7592 update does
        response = authorize(browser, server, mcp_client)
        assert response.status_code == 400 and "Location" not in response
        assert "not registered" in response.content.decode()

    def test_a_deleted_client_is_unknown_at_once(self, browser, server, mcp_client):
        assert authorize(browser, server, mcp_client).status_code == 302
        client_delete(client=mcp_client, actor=None)
        response = authorize(browser, server, mcp_client)
        assert response.status_code == 400 and "Location" not in response

    def test_a_new_browser_is_sent_to_consent_with_one_insert(self, browser, server, mcp_client,
                                                               django_assert_num_queries):
        authorize(HttpClient(), server, mcp_client)  # another browser: the client row is cached now
        with django_assert_num_queries(1):  # the pending request; nothing remembered to look for
            response = authorize(browser, server, mcp_client)
        assert response["Location"].startswith("/oauth/crm/consent?request=")


# -- fuzzing: whatever arrives, the answer is a 4xx page or a redirect, never a 500 ----------------------

_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80
) | st.sampled_from(["", "S256", "plain", "code", "token", RESOURCE, DEFAULT_REDIRECT_URI, "\x00", "%00", "a" * 300])
_NAMES = [
    "client_id", "redirect_uri", "response_type", "code_challenge", "code_challenge_method", "state", "scope",
    "resource", "response_mode", "request", "request_uri", "prompt",
]


@pytest.mark.django_db
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overrides=st.dictionaries(st.sampled_from(_NAMES), st.lists(_text, min_size=0, max_size=3), max_size=6),
    keep_valid=st.booleans(),
)
def test_fuzzed_authorize_requests_never_fail_with_5xx(server, mcp_client, settings, overrides, keep_valid):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"authorize:client": (0, 60)}}
    base = authorize_params(mcp_client, resource=RESOURCE) if keep_valid else {}
    query = {name: [value] for name, value in base.items()}
    query.update(overrides)
    response = HttpClient().get("/oauth/crm/authorize", query)
    assert response.status_code < 500
    if response.status_code == 302:
        location = response["Location"]
        assert location.startswith(("/oauth/crm/consent?", DEFAULT_REDIRECT_URI + "?")), location
