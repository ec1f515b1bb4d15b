from unittest import mock

import pytest
from django.db import OperationalError


@pytest.mark.django_db
def test_database_outage_at_the_token_endpoint_is_a_json_503(client, server):
    with mock.patch(
        "oauthproxy.authserver.views.protocol.server_get_enabled", side_effect=OperationalError("too many clients")):
        response = client.post(f"/oauth/{server.slug}/token", {"grant_type": "refresh_token"})
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response["Retry-After"] == "5"
    assert response["Cache-Control"] == "no-store"


@pytest.mark.django_db
def test_database_outage_on_a_page_is_a_plain_503(client, server):
    with mock.patch("oauthproxy.authserver.views.authorize.server_get_enabled", side_effect=OperationalError("down")):
        response = client.get(f"/oauth/{server.slug}/authorize")
    assert response.status_code == 503
    assert b"temporarily unavailable" in response.content
