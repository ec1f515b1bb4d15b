"""GET /metrics (DESIGN §2): Prometheus metrics for operators, what is counted, how it is protected, and
prometheus_client's multi-process mode for several uvicorn workers."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
import responses
from django.core.cache import cache
from django.test import Client as HttpClient
from prometheus_client import REGISTRY

from oauthproxy.core import metrics
from tests.flows.helpers import (
    DEFAULT_CODE_VERIFIER,
    DEFAULT_REDIRECT_URI,
    approve_consent,
    authorization_flow,
    callback,
    make_client,
    query_of,
    start_authorization,
    upstream_redirect,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """``with Delta(name, **labels) as d: ...; d.value`` is how much the sample grew."""

    def __init__(self, name: str, **labels):
        self.name, self.labels = name, labels

    def __enter__(self):
        self.before = value(self.name, **self.labels)
        return self

    def __exit__(self, *exc):
        self.value = value(self.name, **self.labels) - self.before


def form_post(http: HttpClient, url: str, data: dict):
    return http.post(url, urlencode(data), content_type="application/x-www-form-urlencoded")


def scrape(http: HttpClient, **headers) -> str:
    response = http.get("/metrics", **headers)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


# -- the endpoint ----------------------------------------------------------------------------------

def test_metrics_are_served_in_the_prometheus_format_without_a_database():
    # No `db` fixture: pytest-django fails the test on any database access.
    response = HttpClient().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    body = response.content.decode()
    for name in ("oauthproxy_token_requests_total", "oauthproxy_upstream_request_duration_seconds",
                 "oauthproxy_gateway_requests_total", "oauthproxy_authorizations_started_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in body, name
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_only_get(settings):
    assert HttpClient().post("/metrics").status_code == 405


def test_the_metrics_token_protects_the_endpoint(settings):
    settings.METRICS_TOKEN = "scrape-token-123"
    http = HttpClient()
    missing = http.get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert b"oauthproxy_" not in missing.content
    assert http.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong-token").status_code == 401
    assert http.get("/metrics", HTTP_AUTHORIZATION="Basic c2NyYXBlLXRva2VuLTEyMw==").status_code == 401
    assert "oauthproxy_token_requests" in scrape(http, HTTP_AUTHORIZATION="Bearer scrape-token-123")
    assert "oauthproxy_token_requests" in scrape(http, HTTP_AUTHORIZATION="bearer scrape-token-123")


# -- what is counted -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_whole_flow_counts_authorization_upstream_and_token_metrics(server):
    server.userinfo_endpoint = "https://idp.example.com/userinfo"
    server.save()
    mcp_client = make_client(server)
    http = HttpClient()
    started = Delta("oauthproxy_authorizations_started_total", server="crm")
    completed = Delta("oauthproxy_authorizations_completed_total", server="crm")
    exchange = Delta("oauthproxy_upstream_requests_total", server="crm", kind="code_exchange", outcome="2xx")
    userinfo = Delta("oauthproxy_upstream_requests_total", server="crm", kind="userinfo", outcome="2xx")
    latency = Delta("oauthproxy_upstream_request_duration_seconds_count", kind="code_exchange")
    issued = Delta("oauthproxy_token_requests_total", server="crm", grant_type="authorization_code",
                   outcome="issued")
    replayed_code = Delta("oauthproxy_token_requests_total", server="crm", grant_type="authorization_code",
                          outcome="invalid_grant")
    with started, completed, exchange, userinfo, latency, issued, replayed_code:
        result = authorization_flow(http, server, mcp_client, userinfo={"sub": "subject-secret-person"})
        redeem = {"grant_type": "authorization_code", "code": result.code, "code_verifier": DEFAULT_CODE_VERIFIER,
                  "redirect_uri": DEFAULT_REDIRECT_URI, "client_id": mcp_client.client_id}
        tokens = form_post(http, f"/oauth/{server.slug}/token", redeem)
        assert tokens.status_code == 200, tokens.content
        assert form_post(http, f"/oauth/{server.slug}/token", redeem).status_code == 400  # used code
    assert (started.value, completed.value, exchange.value, userinfo.value, latency.value) == (1, 1, 1, 1, 1)
    assert (issued.value, replayed_code.value) == (1, 1)

    # nothing secret or per-user in any label
    body = scrape(http)
    for text in (tokens.json()["access_token"], tokens.json()["refresh_token"], result.code, mcp_client.client_id,
                 "subject-secret-person", result.upstream_tokens["access_token"]):
        assert text not in body


@pytest.mark.django_db
def test_token_errors_are_counted_by_grant_type_and_error(server):
    http = HttpClient()
    with Delta("oauthproxy_token_requests_total", server="crm", grant_type="other",
               outcome="unsupported_grant_type") as unsupported:
        form_post(http, "/oauth/crm/token", {"grant_type": "password", "client_id": "x"})
    with Delta("oauthproxy_token_requests_total", server="crm", grant_type="none", outcome="invalid_request") as bad:
        form_post(http, "/oauth/crm/token", {"client_id": "x"})
    with Delta("oauthproxy_token_requests_total", server="crm", grant_type="refresh_token",
               outcome="invalid_client") as unknown_client:
        form_post(http, "/oauth/crm/token", {"grant_type": "refresh_token", "refresh_token": "r", "client_id": "nope"})
    assert (unsupported.value, bad.value, unknown_client.value) == (1, 1, 1)


@pytest.mark.django_db
def test_failed_authorizations_are_counted_by_reason(server):
    mcp_client = make_client(server)
    with Delta("oauthproxy_authorizations_failed_total", server="crm", reason="consent_denied") as denied:
        http = HttpClient()
        approve_consent(http, start_authorization(http, server, mcp_client), decision="deny")
    with Delta("oauthproxy_authorizations_failed_total", server="crm", reason="upstream_denied") as refused:
        http = HttpClient()
        state = query_of(upstream_redirect(http, server, mcp_client))["state"]
        callback(http, server, state=state, code=None, error="access_denied")
    with Delta("oauthproxy_authorizations_failed_total", server="crm", reason="code_exchange") as exchange, \
            Delta("oauthproxy_upstream_requests_total", server="crm", kind="code_exchange", outcome="4xx") as four:
        http = HttpClient()
        state = query_of(upstream_redirect(http, server, mcp_client))["state"]
        with responses.RequestsMock() as mock:
            mock.add(responses.POST, server.token_endpoint, status=400, json={"error": "invalid_grant"})
            callback(http, server, state=state)
    assert (denied.value, refused.value, exchange.value, four.value) == (1, 1, 1, 1)


@pytest.mark.django_db
def test_upstream_timeouts_and_revocations_are_counted(server):
    from oauthproxy.core.exceptions import UpstreamError
    from oauthproxy.upstream.client import UpstreamClient

    server.revocation_endpoint = "https://idp.example.com/revoke"
    server.save()
    upstream = UpstreamClient(server)
    with Delta("oauthproxy_upstream_requests_total", server="crm", kind="refresh", outcome="timeout") as timeout, \
            Delta("oauthproxy_upstream_requests_total", server="crm", kind="revoke", outcome="2xx") as revoked, \
            responses.RequestsMock() as mock:
        mock.add(responses.POST, server.token_endpoint, body=requests.ConnectTimeout())
        mock.add(responses.POST, server.revocation_endpoint, status=200)
        with pytest.raises(UpstreamError):
            upstream.refresh(refresh_token="r")
        assert upstream.revoke(token="t", token_type_hint="access_token")
    assert (timeout.value, revoked.value) == (1, 1)


@pytest.mark.django_db
def test_registrations_are_counted_by_outcome(server):
    http = HttpClient()
    body = {"redirect_uris": ["http://127.0.0.1:3000/callback"], "token_endpoint_auth_method": "none",
            "client_name": "metrics test"}
    with Delta("oauthproxy_registrations_total", server="crm", outcome="created") as created:
        assert http.post("/oauth/crm/register", json.dumps(body), content_type="application/json").status_code == 201
    with Delta("oauthproxy_registrations_total", server="crm", outcome="invalid_redirect_uri") as rejected:
        bad = {**body, "redirect_uris": ["javascript:alert(1)"]}
        assert http.post("/oauth/crm/register", json.dumps(bad), content_type="application/json").status_code == 400
    assert (created.value, rejected.value) == (1, 1)


def test_gateway_helper_bounds_its_labels():
    with Delta("oauthproxy_gateway_requests_total", server="crm", method="POST", status="200") as ok, \
            Delta("oauthproxy_gateway_requests_total", server="unknown", method="other", status="404") as unknown, \
            Delta("oauthproxy_gateway_request_duration_seconds_count", server="crm") as latency:
        metrics.gateway_request_record(server="crm", method="post", status=200, seconds=0.02)
        metrics.gateway_request_record(server=None, method="PROPFIND", status=404, seconds=0.001)
    assert (ok.value, unknown.value, latency.value) == (1, 1, 1)


def test_label_values_outside_the_known_sets_are_folded():
    with Delta("oauthproxy_token_requests_total", server="s", grant_type="other", outcome="other_error") as folded:
        metrics.token_request_record(server="s", grant_type="urn:made:up", outcome="<script>")
    with Delta("oauthproxy_authorizations_failed_total", server="s", reason="other") as reason:
        metrics.authorization_failed(server="s", reason="anything a caller invents")
    assert (folded.value, reason.value) == (1, 1)


def test_a_process_labels_a_bounded_number_of_servers(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_SERVER_LABELS", len(metrics._server_labels) + 1)
    with Delta("oauthproxy_gateway_requests_total", server="other", method="GET", status="401") as overflow:
        metrics.gateway_request_record(server="first-new-slug", method="GET", status=401, seconds=0.01)
        metrics.gateway_request_record(server="second-new-slug", method="GET", status=401, seconds=0.01)
        metrics.gateway_request_record(server="first-new-slug", method="GET", status=401, seconds=0.01)
    assert overflow.value == 1
    assert value("oauthproxy_gateway_requests_total", server="first-new-slug", method="GET", status="401") == 2


@pytest.mark.django_db
def test_admin_try_it_is_not_counted_as_an_mcp_authorization(server, admin_client):
    with Delta("oauthproxy_authorizations_started_total", server="crm") as started:
        assert admin_client.post(f"/admin/oauthproxy/mcpserver/{server.pk}/try-it/").status_code == 302
    assert started.value == 0


# -- several worker processes ----------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    from oauthproxy.core import metrics
    for _ in range(int(sys.argv[1])):
        metrics.token_request_record(server="crm", grant_type="refresh_token", outcome="issued")
    metrics.gateway_request_record(server="crm", method="GET", status=200, seconds=0.5)
    if len(sys.argv) > 2:
        sys.stdout.write(metrics.metrics_exposition()[0].decode())
""")


def test_multiprocess_mode_adds_up_every_worker(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}

    def worker(*args: str) -> str:
        result = subprocess.run([sys.executable, "-c", WORKER, *args], env=env, capture_output=True, text=True,
                                timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return result.stdout

    worker("2")
    worker("3")
    exposition = worker("1", "scrape")  # a third worker answers the scrape
    line = next(line for line in exposition.splitlines()
                if line.startswith("oauthproxy_token_requests_total{")
                and 'grant_type="refresh_token"' in line and 'server="crm"' in line)
    assert float(line.rsplit(" ", 1)[1]) == 6.0
    assert 'oauthproxy_gateway_request_duration_seconds_count{server="crm"} 3.0' in exposition
