"""The OAuth endpoints programs call, served by the ASGI entry point past Django's middleware stack
(``oauthproxy.authserver.asgi``): same answers as through Django, with what the middleware added kept."""

import asyncio
import json
import re
import threading
from unittest import mock

import httpx
import pytest
from django.core import signals
from django.db import OperationalError

from oauthproxy.models import Client

pytestmark = pytest.mark.django_db(transaction=True)  # the views run on the endpoint threads

REGISTRATION = {
    "client_name": "Direct",
    "redirect_uris": ["http://127.0.0.1:3333/callback"],
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "token_endpoint_auth_method": "none",
}


def asgi_request(method: str, path: str, *, content: bytes = b"", headers: dict | None = None) -> httpx.Response:
    from proxy_site.asgi import application

    async def call():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            return await client.request(method, path, content=content, headers=headers or {})

    return asyncio.run(call())


@pytest.fixture
def handler_threads():
    """The names of the threads the requests ran on."""
    names = []

    def record(**_kwargs):
        names.append(threading.current_thread().name)

    signals.request_started.connect(record)
    yield names
    signals.request_started.disconnect(record)


def test_registration_runs_on_the_endpoint_threads_and_answers_as_through_django(server, handler_threads):
    response = asgi_request(
        "POST", f"/oauth/{server.slug}/register", content=json.dumps(REGISTRATION).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201
    body = response.json()
    assert Client.objects.filter(server=server, client_id=body["client_id"]).exists()
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware's header
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Length"] == str(len(response.content))
    assert handler_threads and all(name.startswith("oauth-endpoint") for name in handler_threads)


def test_token_errors_keep_their_rfc_6749_shape(server, handler_threads):
    response = asgi_request(
        "POST", f"/oauth/{server.slug}/token", content=b"grant_type=password&username=a&password=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert handler_threads[0].startswith("oauth-endpoint")


def test_a_database_outage_is_a_json_503_with_retry_after(server):
    with mock.patch(
        "oauthproxy.authserver.views.protocol.server_get_enabled", side_effect=OperationalError("too many clients")):
        response = asgi_request(
            "POST", f"/oauth/{server.slug}/token", content=b"grant_type=refresh_token&refresh_token=x&client_id=y",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["Retry-After"] == "5"


def test_an_unexpected_error_is_a_500_without_details(server, caplog):
    with mock.patch(
        "oauthproxy.authserver.views.protocol.server_get_enabled", side_effect=RuntimeError("secret-ish detail")):
        response = asgi_request(
            "POST", f"/oauth/{server.slug}/token", content=b"grant_type=refresh_token",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 500
    assert b"secret-ish detail" not in response.content


def test_a_host_outside_allowed_hosts_is_refused(server, settings):
    settings.ALLOWED_HOSTS = ["proxy.example.com"]
    response = asgi_request(
        "POST", f"/oauth/{server.slug}/register", content=json.dumps(REGISTRATION).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert not Client.objects.filter(server=server).exists()


def test_an_oversized_body_is_refused_before_the_view(server, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    response = asgi_request(
        "POST", f"/oauth/{server.slug}/token", content=b"grant_type=refresh_token&x=" + b"a" * 4096,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_the_login_pages_run_on_the_endpoint_threads_with_the_whole_middleware_stack(server, handler_threads):
    """Authorize, then the consent page: cookies set and sent back, CSRF enforced, security headers kept."""
    from proxy_site.asgi import application
    from tests.flows.helpers import authorize_params, make_client

    client = make_client(server)

    async def flow():
        transport = httpx.ASGITransport(app=application)
        # https: the test settings' PUBLIC_BASE_URL is https, so the proxy's cookies are Secure.
        origin = {"Origin": "https://proxy.test"}
        async with httpx.AsyncClient(transport=transport, base_url="https://proxy.test") as browser:
            started = await browser.get(f"/oauth/{server.slug}/authorize", params=authorize_params(client))
            consent_url = started.headers["Location"]
            page = await browser.get(consent_url)
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)[1]
            request_id = re.search(r'name="request" value="([^"]+)"', page.text)[1]
            answer = {"request": request_id, "decision": "approve"}
            forged = await browser.post(consent_url, data=answer, headers=origin)
            approved = await browser.post(
                consent_url, data={"request": request_id, "decision": "approve", "csrfmiddlewaretoken": token},
                headers=origin,
            )
            return started, page, forged, approved

    started, page, forged, approved = asyncio.run(flow())
    assert started.status_code == 302 and "set-cookie" in started.headers  # the browser binding cookie
    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "csrftoken=" in page.headers.get("set-cookie", "")
    assert forged.status_code == 403  # CsrfViewMiddleware ran
    assert approved.status_code == 302
    assert approved.headers["Location"].startswith(server.authorization_endpoint)
    assert handler_threads and all(name.startswith("oauth-endpoint") for name in handler_threads)


def test_other_paths_still_go_through_django(server, handler_threads):
    response = asgi_request("GET", "/admin/login/")
    assert response.status_code == 200
    assert not any(name.startswith("oauth-endpoint") for name in handler_threads)
    response = asgi_request("POST", f"/oauth/{server.slug}/token/extra")
    assert response.status_code == 404
