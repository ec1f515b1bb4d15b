"""An admin who browses from a host other than PUBLIC_BASE_URL's is told so: on every server page of the
admin, and by Check connection (admin and API), where it counts as a problem."""

import pytest
import responses

from oauthproxy.core.public_url import public_url_mismatch
from oauthproxy.upstream.check import server_connection_check


@pytest.mark.parametrize(("origin", "public", "mismatch"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000", False),
    ("http://127.0.0.1:8000", "http://127.0.0.1:9000", True),  # `PORT=9000 make run` before the fix
    ("http://localhost:8000", "http://127.0.0.1:8000", True),
    ("http://proxy.example.com", "https://proxy.example.com", False),  # TLS ends at a proxy in front
    ("https://PROXY.example.com:443", "https://proxy.example.com", False),
    ("http://internal:8000", "https://proxy.example.com", True),
])
def test_the_host_of_the_request_against_public_base_url(settings, origin, public, mismatch):
    settings.PUBLIC_BASE_URL = public
    assert (public_url_mismatch(origin=origin) is not None) is mismatch


@pytest.fixture
def admin_http(client, django_user_model):
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["", "{pk}/change/", "add/", "{pk}/check/", "{pk}/try-it/", "{pk}/discover/"])
def test_every_server_page_warns_when_browsed_from_another_host(admin_http, server, settings, page):
    settings.PUBLIC_BASE_URL = "http://127.0.0.1:9000"
    url = "/admin/oauthproxy/mcpserver/" + page.format(pk=server.pk)
    response = admin_http.get(url, HTTP_HOST="127.0.0.1:8000")
    assert response.status_code == 200
    assert "but PUBLIC_BASE_URL is http://127.0.0.1:9000" in response.content.decode()

    settings.PUBLIC_BASE_URL = "http://127.0.0.1:8000"
    assert "PUBLIC_BASE_URL is" not in admin_http.get(url, HTTP_HOST="127.0.0.1:8000").content.decode()


@pytest.mark.django_db
def test_check_connection_reports_another_host_as_a_problem(admin_http, server, settings):
    settings.PUBLIC_BASE_URL = "http://127.0.0.1:9000"
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # the upstream is unreachable here
        check = server_connection_check(server=server, request_origin="http://127.0.0.1:8000")
        assert check.results[0].name == "Public URL" and check.results[0].status == "error"
        response = admin_http.post(f"/api/v1/servers/{server.slug}/check/", HTTP_HOST="127.0.0.1:8000")
    assert response.status_code == 200, response.content
    assert any(result["name"] == "Public URL" and result["status"] == "error" for result in response.json()["results"])

    settings.PUBLIC_BASE_URL = "http://127.0.0.1:8000"
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        check = server_connection_check(server=server, request_origin="http://127.0.0.1:8000")
    assert all(result.name != "Public URL" for result in check.results)
