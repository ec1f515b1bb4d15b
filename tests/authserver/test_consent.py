"""GET/POST /oauth/<slug>/consent (DESIGN §4, §5.6, §5.7)."""

import hashlib
import os
import re
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlencode

import pytest
import responses
from django.conf import settings as django_settings
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client as HttpClient
from django.utils import timezone

from oauthproxy.authserver.views.authorize import BROWSER_COOKIE
from oauthproxy.console.clients import client_update
from oauthproxy.models import AuditEvent, Client, Consent, Grant, PendingAuthorization
from tests.conftest import make_server
from tests.factories import run_in_threads
from tests.flows.helpers import (
    DEFAULT_REDIRECT_URI,
    DEFAULT_STATE,
    approve_consent,
    authorization_flow,
    authorize,
    authorize_params,
    make_client,
    pkce_pair,
    query_of,
    start_authorization,
)

ISSUER = "https://proxy.example.test/oauth/crm"
CHROMIUM = "/usr/bin/chromium"


def request_id(consent_url: str) -> str:
    return query_of(consent_url)["request"]


def post(http: HttpClient, consent_url: str, decision: str = "approve", HTTP_ORIGIN: str | None = None, **extra):
    headers = {"HTTP_ORIGIN": HTTP_ORIGIN} if HTTP_ORIGIN else {}
    return http.post(consent_url, {"request": request_id(consent_url), "decision": decision, **extra}, **headers)


@pytest.mark.django_db
class TestConsentPage:
    def test_shows_what_the_user_decides_on(self, browser, server, mcp_client):
        page = browser.get(start_authorization(browser, server, mcp_client))
        assert page.status_code == 200
        html = page.content.decode()
        assert "Test MCP Client" in html
        assert "CRM tools" in html  # the MCP server
        assert "127.0.0.1" in html  # where the user is sent back
        assert "an application on this computer" in html
        assert "Unverified" in html and "not verified" in html
        for scope in ("openid", "email", "offline_access"):
            assert f"<code>{scope}</code>" in html
        assert "idp.example.com" in html  # where the user signs in next
        assert 'value="approve"' in html and 'value="deny"' in html
        assert 'name="csrfmiddlewaretoken"' in html
        assert 'name="remember"' in html and "30 days" in html

    def test_lists_what_the_client_asked_for_and_what_the_upstream_is_asked(self, browser, server, mcp_client):
        server.scopes = ["openid", "email", "offline_access", "profile"]
        server.save()
        page = browser.get(start_authorization(browser, server, mcp_client, scope="openid email"))
        html = page.content.decode()
        asked = html[html.index('id="client-scopes"'):]
        asked = asked[:asked.index("</ul>")]
        assert "Confirm who you are" in asked and "Your email address" in asked
        assert "offline_access" not in asked and "profile" not in asked
        upstream_part = html[html.index('id="upstream-scopes"'):]
        upstream_part = upstream_part[:upstream_part.index("</ul>")]
        assert "Your name and basic profile" in upstream_part and "Stay connected while you are away" in upstream_part
        assert "idp.example.com will be asked for" in html

    def test_cannot_be_framed_and_is_not_cached(self, browser, server, mcp_client):
        page = browser.get(start_authorization(browser, server, mcp_client))
        assert page["X-Frame-Options"] == "DENY"
        csp = page["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp
        assert "default-src 'none'" in csp
        assert "script-src" not in csp  # falls back to default-src 'none': no script at all
        assert "no-store" in page["Cache-Control"]

    def test_client_supplied_text_is_escaped(self, browser, server):
        evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
        mcp_client = make_client(server, name=evil)
        html = browser.get(start_authorization(browser, server, mcp_client)).content.decode()
        assert "<script>" not in html and "<img" not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html

    def test_server_name_is_escaped_too(self, browser, server, mcp_client):
        server.name = "<b>CRM</b>"
        server.save()
        html = browser.get(start_authorization(browser, server, mcp_client)).content.decode()
        assert "<b>CRM</b>" not in html and "&lt;b&gt;CRM&lt;/b&gt;" in html

    def test_cimd_client_shows_its_verified_domain(self, browser, server):
        url = "https://app.example.org/oauth/client.json"
        mcp_client = make_client(
            server,
            client_id=url,
            registration_source=Client.RegistrationSource.CIMD,
            redirect_uris=["https://app.example.org/callback"],
            cimd_expires_at=timezone.now() + timedelta(hours=1),
        )
        consent_url = start_authorization(
            browser, server, mcp_client, redirect_uri="https://app.example.org/callback"
        )
        html = browser.get(consent_url).content.decode()
        assert "Verified: app.example.org" in html
        assert "Unverified" not in html

    def test_client_registered_by_an_administrator(self, browser, server):
        mcp_client = make_client(server, registration_source=Client.RegistrationSource.MANUAL)
        html = browser.get(start_authorization(browser, server, mcp_client)).content.decode()
        assert "Registered by your administrator" in html
        assert "Unverified" not in html and "not verified" not in html

    def test_private_use_scheme_shown_as_scheme(self, browser, server):
        mcp_client = make_client(server, redirect_uris=["com.example.app:/cb"])
        html = browser.get(
            start_authorization(browser, server, mcp_client, redirect_uri="com.example.app:/cb")
        ).content.decode()
        assert "<code>com.example.app:</code>" in html

    def test_no_remember_checkbox_when_remembering_is_off(self, browser, server, mcp_client, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CONSENT_REMEMBER_SECONDS": 0}
        consent_url = start_authorization(browser, server, mcp_client)
        assert 'name="remember"' not in browser.get(consent_url).content.decode()
        assert post(browser, consent_url, remember="yes").status_code == 302
        assert not Consent.objects.exists()

    @pytest.mark.parametrize("value", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "\x00"])
    def test_bad_request_ids_are_pages(self, browser, server, mcp_client, value):
        authorize(browser, server, mcp_client)
        response = browser.get("/oauth/crm/consent", {"request": value})
        assert response.status_code == 400
        assert "Location" not in response

    def test_unknown_server(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        assert browser.get(consent_url.replace("/crm/", "/nope/")).status_code == 404

    def test_request_of_another_server_is_unknown(self, browser, server, mcp_client):
        make_server(slug="wiki", name="Wiki")
        consent_url = start_authorization(browser, server, mcp_client)
        response = browser.get(consent_url.replace("/crm/", "/wiki/"))
        assert response.status_code == 400
        assert post(browser, consent_url.replace("/crm/", "/wiki/")).status_code == 400
        assert PendingAuthorization.objects.get().approved_at is None

    def test_expired_request(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        PendingAuthorization.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
        response = browser.get(consent_url)
        assert response.status_code == 400 and "expired" in response.content.decode()
        assert post(browser, consent_url).status_code == 400

    def test_unknown_decision(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        response = post(browser, consent_url, decision="maybe")
        assert response.status_code == 400
        assert PendingAuthorization.objects.get().approved_at is None


@pytest.mark.django_db
class TestBrowserBinding:
    def test_another_browser_cannot_see_or_answer_the_request(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        attacker = HttpClient()
        authorize(attacker, server, mcp_client)  # the attacker has a browser key of their own
        assert attacker.cookies[BROWSER_COOKIE].value != browser.cookies[BROWSER_COOKIE].value
        page = attacker.get(consent_url)
        assert page.status_code == 403
        assert "different browser" in page.content.decode()
        response = post(attacker, consent_url)
        assert response.status_code == 403
        assert "Location" not in response
        pending = PendingAuthorization.objects.get(pk=request_id(consent_url))
        assert pending.approved_at is None and pending.state_checksum is None
        # the right browser still can
        assert post(browser, consent_url).status_code == 302

    def test_a_browser_without_the_cookie_is_refused(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        assert HttpClient().get(consent_url).status_code == 403
        assert post(HttpClient(), consent_url, decision="deny").status_code == 403
        assert PendingAuthorization.objects.get().consumed_at is None

    def test_a_forged_cookie_is_refused(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        forger = HttpClient()
        forger.cookies[BROWSER_COOKIE] = PendingAuthorization.objects.get().browser_key_checksum
        assert forger.get(consent_url).status_code == 403


@pytest.mark.django_db
class TestCsrf:
    def test_post_without_csrf_token_is_refused(self, server, mcp_client):
        browser = HttpClient(enforce_csrf_checks=True)
        consent_url = start_authorization(browser, server, mcp_client)
        browser.get(consent_url)
        response = post(browser, consent_url)
        assert response.status_code == 403
        assert "Location" not in response
        assert PendingAuthorization.objects.get().approved_at is None
        assert not AuditEvent.objects.filter(kind=AuditEvent.Kind.CONSENT_GIVEN).exists()

    def test_post_with_a_wrong_csrf_token_is_refused(self, server, mcp_client):
        browser = HttpClient(enforce_csrf_checks=True)
        consent_url = start_authorization(browser, server, mcp_client)
        browser.get(consent_url)
        response = post(browser, consent_url, csrfmiddlewaretoken="x" * 64)
        assert response.status_code == 403
        assert PendingAuthorization.objects.get().approved_at is None

    def test_page_lets_browsers_send_a_real_origin(self, browser, server, mcp_client):
        # under the global no-referrer policy browsers send "Origin: null" with the POST: CSRF would fail
        page = browser.get(start_authorization(browser, server, mcp_client))
        assert page["Referrer-Policy"] == "same-origin"
        assert 'name="referrer"' not in page.content.decode()

    def test_cross_origin_post_is_refused(self, server, mcp_client):
        browser = HttpClient(enforce_csrf_checks=True)
        consent_url = start_authorization(browser, server, mcp_client)
        html = browser.get(consent_url).content.decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
        response = post(browser, consent_url, csrfmiddlewaretoken=token, HTTP_ORIGIN="https://evil.example")
        assert response.status_code == 403
        assert PendingAuthorization.objects.get().approved_at is None

    def test_post_with_the_form_token_works(self, server, mcp_client):
        browser = HttpClient(enforce_csrf_checks=True)
        consent_url = start_authorization(browser, server, mcp_client)
        html = browser.get(consent_url).content.decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
        response = post(browser, consent_url, csrfmiddlewaretoken=token, HTTP_ORIGIN="http://testserver")
        assert response.status_code == 302
        assert response["Location"].startswith("https://idp.example.com/authorize?")


@pytest.mark.django_db
class TestDecision:
    def test_deny_redirects_access_denied_to_the_client(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        response = post(browser, consent_url, decision="deny")
        assert response.status_code == 302
        assert response["Location"].startswith(DEFAULT_REDIRECT_URI + "?")
        params = query_of(response["Location"])
        assert params["error"] == "access_denied"
        assert params["state"] == DEFAULT_STATE
        assert params["iss"] == ISSUER
        pending = PendingAuthorization.objects.get()
        assert pending.consumed_at is not None and pending.state_checksum is None
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CONSENT_DENIED)
        assert event.client == mcp_client and event.server == server
        # answered: neither decision works again
        assert post(browser, consent_url, decision="deny").status_code == 400
        assert post(browser, consent_url).status_code == 400

    def test_approve_creates_the_upstream_state_and_redirects_upstream(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        before = timezone.now()
        response = post(browser, consent_url)
        assert response.status_code == 302
        upstream_url = response["Location"]
        assert upstream_url.startswith("https://idp.example.com/authorize?")
        params = query_of(upstream_url)
        state = params["state"]
        assert len(state) >= 43
        pending = PendingAuthorization.objects.get()
        assert pending.state_checksum == hashlib.sha256(state.encode()).hexdigest()
        assert pending.approved_at is not None and pending.consumed_at is None
        lifetime = timedelta(seconds=600)
        assert before + lifetime - timedelta(seconds=5) <= pending.expires_at <= timezone.now() + lifetime
        # the proxy's own upstream PKCE: S256 of a verifier stored encrypted
        verifier = pending.upstream_code_verifier
        assert params["code_challenge"] == pkce_pair(verifier)[1]
        assert params["code_challenge_method"] == "S256"
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM oauthproxy_pendingauthorization")
            row = repr(cursor.fetchall())
        assert verifier not in row and state not in row
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CONSENT_GIVEN)
        assert event.detail["redirect_uri"] == DEFAULT_REDIRECT_URI and event.detail["remember"] is False

    def test_upstream_request_shape(self, browser, server, mcp_client):
        server.extra_authorize_params = {"audience": "https://api.example.com", "access_type": "offline"}
        server.save()
        consent_url = start_authorization(
            browser, server, mcp_client, resource="https://proxy.example.test/mcp/crm", scope="openid"
        )
        params = query_of(post(browser, consent_url)["Location"])
        assert params["client_id"] == "proxy-client"
        assert params["redirect_uri"] == "https://proxy.example.test/oauth/crm/callback"
        assert params["response_type"] == "code"
        assert params["scope"] == "openid email offline_access"  # the server's upstream scopes
        assert params["prompt"] == "consent"  # offline_access needs it at OpenID upstreams
        assert params["audience"] == "https://api.example.com" and params["access_type"] == "offline"
        assert "resource" not in params  # never forwarded upstream
        assert params["state"] != DEFAULT_STATE  # the client's state stays with the proxy

    def test_without_upstream_pkce(self, browser, server, mcp_client):
        server.use_pkce = False
        server.save()
        params = query_of(post(browser, start_authorization(browser, server, mcp_client))["Location"])
        assert "code_challenge" not in params
        assert PendingAuthorization.objects.get().upstream_code_verifier == ""

    def test_approving_twice_is_refused(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        first = post(browser, consent_url)
        assert first.status_code == 302
        second = post(browser, consent_url)
        assert second.status_code == 400
        assert PendingAuthorization.objects.get().state_checksum == hashlib.sha256(
            query_of(first["Location"])["state"].encode()
        ).hexdigest()

    def test_client_disabled_while_the_page_was_open(self, browser, server, mcp_client):
        consent_url = start_authorization(browser, server, mcp_client)
        Client.objects.filter(pk=mcp_client.pk).update(disabled=True)
        response = post(browser, consent_url)
        assert response.status_code == 400
        assert PendingAuthorization.objects.get().approved_at is None


@pytest.mark.django_db
class TestRememberedConsent:
    def remember(self, browser, server, mcp_client, **kwargs):
        response = approve_consent(browser, start_authorization(browser, server, mcp_client, **kwargs), remember=True)
        assert response.status_code == 302

    def test_remembered_for_the_same_client_and_redirect_uri(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client)
        consent = Consent.objects.get()
        assert consent.client == mcp_client and consent.redirect_uri == DEFAULT_REDIRECT_URI
        assert consent.browser_key_checksum == hashlib.sha256(
            browser.cookies[BROWSER_COOKIE].value.encode()
        ).hexdigest()
        response = authorize(browser, server, mcp_client, state="second")
        assert response.status_code == 302
        assert response["Location"].startswith("https://idp.example.com/authorize?")  # no page this time
        pending = PendingAuthorization.objects.order_by("-created").first()
        assert pending.approved_at is not None and pending.client_state == "second"
        remembered = AuditEvent.objects.filter(kind=AuditEvent.Kind.CONSENT_GIVEN, detail__remembered=True)
        assert remembered.count() == 1

    def test_not_for_another_redirect_uri_of_the_same_client(self, browser, server):
        other_uri = "https://app.example.com/callback"
        mcp_client = make_client(server, redirect_uris=[DEFAULT_REDIRECT_URI, other_uri])
        self.remember(browser, server, mcp_client)
        response = authorize(browser, server, mcp_client, redirect_uri=other_uri)
        assert response["Location"].startswith("/oauth/crm/consent?")
        # nor for another loopback port: consent is per exact redirect URI
        response = authorize(browser, server, mcp_client, redirect_uri="http://127.0.0.1:9999/callback")
        assert response["Location"].startswith("/oauth/crm/consent?")

    def test_not_for_another_client(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client)
        other = make_client(server, name="Other")
        assert authorize(browser, server, other)["Location"].startswith("/oauth/crm/consent?")

    def test_not_for_another_browser(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client)
        assert authorize(HttpClient(), server, mcp_client)["Location"].startswith("/oauth/crm/consent?")

    def test_not_for_more_scopes_than_approved(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client, scope="openid")
        assert authorize(browser, server, mcp_client, scope="openid")["Location"].startswith("https://idp.")
        assert authorize(browser, server, mcp_client, scope="openid email")["Location"].startswith("/oauth/")

    def test_not_after_it_expired(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client)
        Consent.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
        assert authorize(browser, server, mcp_client)["Location"].startswith("/oauth/crm/consent?")

    def test_not_without_the_checkbox(self, browser, server, mcp_client):
        assert approve_consent(browser, start_authorization(browser, server, mcp_client)).status_code == 302
        assert not Consent.objects.exists()
        assert authorize(browser, server, mcp_client)["Location"].startswith("/oauth/crm/consent?")

    def test_not_for_a_disabled_client(self, browser, server, mcp_client):
        self.remember(browser, server, mcp_client)
        client_update(client=mcp_client, actor=None, disabled=True)  # as the admin and the API do
        response = authorize(browser, server, mcp_client)
        assert query_of(response["Location"])["error"] == "unauthorized_client"


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_of_one_request_approve_it_once(server):
    """A double click or a replayed form: exactly one answer creates the upstream state."""
    mcp_client = make_client(server)
    browser = HttpClient()
    consent_url = start_authorization(browser, server, mcp_client)
    cookie = browser.cookies[BROWSER_COOKIE].value
    workers = 6

    def run(_i):
        http = HttpClient()
        http.cookies[BROWSER_COOKIE] = cookie
        response = post(http, consent_url, remember="yes")
        return response["Location"] if response.status_code == 302 else None

    locations = run_in_threads(workers, run)
    approved = [location for location in locations if location is not None]
    assert len(locations) == workers and len(approved) == 1
    pending = PendingAuthorization.objects.get()
    assert pending.state_checksum == hashlib.sha256(query_of(approved[0])["state"].encode()).hexdigest()
    assert Consent.objects.count() == 1
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CONSENT_GIVEN).count() == 1


@pytest.mark.django_db
def test_the_flow_keeps_no_django_session(browser, server, mcp_client):
    """The consent binding is the pending request and the browser-key cookie, never Django's session (see
    SESSION_ENGINE in the settings): a whole flow sets no session cookie and stores no session."""
    authorization_flow(browser, server, mcp_client)
    assert django_settings.SESSION_COOKIE_NAME not in browser.cookies
    assert not Session.objects.exists()


def _chromium_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM)


@pytest.mark.skipif(not _chromium_available(), reason="needs Playwright and Debian's Chromium")
@pytest.mark.django_db(transaction=True)
def test_the_flow_in_a_real_browser(live_server, settings):
    """Chromium, not the test client: the browser cookie (SameSite=Lax) survives the upstream's cross-site
    redirect, the CSRF origin check passes for the real form POST (Origin is not "null"), the CSP lets the
    inline stylesheet apply, and form submission follows the redirect chain to the upstream and back."""
    from playwright.sync_api import sync_playwright

    settings.PUBLIC_BASE_URL = live_server.url
    seen: dict[str, str] = {}

    class ClientApp(BaseHTTPRequestHandler):  # the MCP client's loopback callback listener
        def do_GET(self):
            seen["client"] = f"http://127.0.0.1:{self.server.server_port}{self.path}"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"connected")

        def log_message(self, *args):
            pass

    app = HTTPServer(("127.0.0.1", 0), ClientApp)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    redirect_uri = f"http://127.0.0.1:{app.server_port}/callback"
    server = make_server()
    mcp_client = make_client(server, name="Browser Test Client", redirect_uris=["http://127.0.0.1/callback"])
    query = urlencode(authorize_params(mcp_client, redirect_uri=redirect_uri))
    authorize_url = f"{live_server.url}/oauth/crm/authorize?{query}"

    def upstream_login(route):
        seen["upstream"] = route.request.url
        state = query_of(route.request.url)["state"]
        location = f"{live_server.url}/oauth/crm/callback?code=upstream-code&state={state}"
        route.fulfill(status=302, headers={"Location": location})

    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream, sync_playwright() as pw:
        upstream.add(responses.POST, server.token_endpoint, json={"access_token": "at", "expires_in": 3600})
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            violations: list[str] = []
            page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text
                    else None)
            page.route("https://idp.example.com/**", upstream_login)
            page.goto(authorize_url)
            assert page.locator("h1").inner_text() == "Allow Browser Test Client to use CRM tools?"
            approve = page.locator("button[value=approve]")
            assert approve.evaluate("b => getComputedStyle(b).borderRadius") == "8px"  # inline CSS applied
            approve.click()
            page.wait_for_url(f"{redirect_uri}?*")
            assert "connected" in page.content()
        finally:
            browser.close()
            app.shutdown()
    assert not violations
    assert seen["upstream"].startswith("https://idp.example.com/authorize?")
    answer = query_of(seen["client"])
    assert answer["state"] == DEFAULT_STATE and answer["iss"] == f"{live_server.url}/oauth/crm"
    assert Grant.objects.get().code == hashlib.sha256(answer["code"].encode()).hexdigest()
