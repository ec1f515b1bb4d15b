"""RFC errors for bad encodings (issue 13, finding 8): a form in a charset other than UTF-8 on the token,
revocation and introspection endpoints is ``invalid_request`` as JSON with ``Cache-Control: no-store``,
both on the endpoint threads (``proxy_site.asgi``) and through Django's handler (the test client)."""

import pytest

from tests.authserver.test_asgi import asgi_request
from tests.conftest import make_server

ENDPOINTS = ["token", "revoke", "introspect"]
CHARSETS = ["iso-8859-1", "utf-16", "rot13", "base64"]
BODY = b"grant_type=refresh_token&refresh_token=abc&token=abc&client_id=c\xe9"


def assert_rfc_invalid_request(status: int, headers, body: dict) -> None:
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    assert body["error"] == "invalid_request"


@pytest.mark.django_db
@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_through_djangos_handler(client, endpoint, charset):
    make_server(slug="crm")
    response = client.generic(
        "POST", f"/oauth/crm/{endpoint}", data=BODY,
        content_type=f"application/x-www-form-urlencoded; charset={charset}",
    )
    assert_rfc_invalid_request(response.status_code, response, response.json())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_on_the_endpoint_threads(endpoint, charset):
    make_server(slug="crm")
    response = asgi_request(
        "POST", f"/oauth/crm/{endpoint}", content=BODY,
        headers={"Content-Type": f"application/x-www-form-urlencoded; charset={charset}", "Host": "testserver"},
    )
    assert_rfc_invalid_request(response.status_code, response.headers, response.json())
