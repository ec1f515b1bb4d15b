"""POST /oauth/<slug>/introspect (RFC 7662) for the resource servers of one MCP server."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import AccessToken, IntrospectionCredential
from tests.factories import basic_auth, form_post, issue_tokens, make_client, make_introspection_credential, refresh


@pytest.fixture
def http(client):
    return client


@pytest.fixture
def credential(server):
    return make_introspection_credential(server)


def introspect(http, server, credential, token, **extra):
    cred, secret = credential
    return form_post(http, f"/oauth/{server.slug}/introspect", {"token": token, **extra},
                     HTTP_AUTHORIZATION=basic_auth(cred.client_id, secret))


@pytest.mark.django_db
class TestIntrospection:
    def test_active_access_token(self, http, server, credential):
        client = make_client(server)
        tokens = issue_tokens(http, server, client, scope="openid email", subject="alice@example.com",
                              access_token="upstream-secret-at", refresh_token="upstream-secret-rt")
        response = introspect(http, server, credential, tokens["access_token"])

        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        body = response.json()
        assert body == {
            "active": True,
            "scope": "openid email",
            "client_id": client.client_id,
            "token_type": "Bearer",
            "exp": body["exp"],
            "iat": body["iat"],
            "aud": server.resource_url,
            "sub": "alice@example.com",
            "iss": server.issuer_url,
        }
        assert abs(body["exp"] - (timezone.now() + timedelta(seconds=3600)).timestamp()) < 10
        assert body["iat"] <= timezone.now().timestamp()
        assert "upstream-secret" not in response.content.decode()

    def test_token_of_another_server_is_inactive(self, http, server, server_factory, credential):
        other = server_factory(slug="other")
        tokens = issue_tokens(http, other, make_client(other))
        assert introspect(http, server, credential, tokens["access_token"]).json() == {"active": False}
        # ...while that server's own resource servers see it active.
        assert introspect(http, other, make_introspection_credential(other), tokens["access_token"]).json()["active"]

    def test_credential_of_another_server_is_refused(self, http, server, server_factory):
        other = server_factory(slug="other")
        tokens = issue_tokens(http, server, make_client(server))
        response = introspect(http, server, make_introspection_credential(other), tokens["access_token"])
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"

    def test_expired_token_is_inactive(self, http, server, credential):
        tokens = issue_tokens(http, server, make_client(server))
        AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
        assert introspect(http, server, credential, tokens["access_token"]).json() == {"active": False}

    def test_revoked_grant_is_inactive(self, http, server, credential):
        tokens = issue_tokens(http, server, make_client(server))
        upstream_session_revoke(session=tokens["session"], reason="test")
        assert introspect(http, server, credential, tokens["access_token"]).json() == {"active": False}

    def test_rotated_access_token_is_inactive(self, http, server, credential):
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        new = refresh(http, server, client, tokens["refresh_token"]).json()
        assert introspect(http, server, credential, tokens["access_token"]).json() == {"active": False}
        assert introspect(http, server, credential, new["access_token"]).json()["active"] is True

    def test_disabled_client_token_is_inactive(self, http, server, credential):
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        client.disabled = True
        client.save()
        assert introspect(http, server, credential, tokens["access_token"]).json() == {"active": False}

    def test_refresh_and_unknown_tokens_are_inactive(self, http, server, credential):
        tokens = issue_tokens(http, server, make_client(server))
        for token in (tokens["refresh_token"], "unknown", "x" * 5000):
            assert introspect(http, server, credential, token).json() == {"active": False}
        assert introspect(http, server, credential, tokens["refresh_token"],
                          token_type_hint="refresh_token").json() == {"active": False}

    def test_client_secret_post_is_accepted(self, http, server, credential):
        cred, secret = credential
        tokens = issue_tokens(http, server, make_client(server))
        response = form_post(http, f"/oauth/{server.slug}/introspect",
                             {"token": tokens["access_token"], "client_id": cred.client_id, "client_secret": secret})
        assert response.json()["active"] is True

    @pytest.mark.parametrize("header", [None, "Bearer x", "Basic !!", "Basic " + "cnNfeDp5"])
    def test_missing_or_bad_credentials_are_invalid_client(self, http, server, credential, header):
        tokens = issue_tokens(http, server, make_client(server))
        headers = {"HTTP_AUTHORIZATION": header} if header else {}
        response = form_post(http, f"/oauth/{server.slug}/introspect", {"token": tokens["access_token"]}, **headers)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert response["WWW-Authenticate"].startswith("Basic realm=")
        assert "active" not in response.json()

    def test_wrong_secret_and_revoked_credential_are_refused(self, http, server, credential):
        cred, secret = credential
        tokens = issue_tokens(http, server, make_client(server))
        assert introspect(http, server, (cred, secret + "x"), tokens["access_token"]).status_code == 401
        assert introspect(http, server, credential, tokens["access_token"]).status_code == 200  # cached as verified
        IntrospectionCredential.objects.filter(pk=cred.pk).update(revoked=True)
        assert introspect(http, server, credential, tokens["access_token"]).status_code == 401

    def test_an_mcp_client_cannot_introspect(self, http, server):
        client = make_client(server, public=False)
        tokens = issue_tokens(http, server, client)
        response = form_post(http, f"/oauth/{server.slug}/introspect", {"token": tokens["access_token"]},
                             HTTP_AUTHORIZATION=basic_auth(client.client_id, client.plain_client_secret))
        assert response.status_code == 401

    def test_missing_token_is_invalid_request(self, http, server, credential):
        response = introspect(http, server, credential, "")
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"

    def test_json_body_is_invalid_request(self, http, server, credential):
        cred, secret = credential
        response = http.post(f"/oauth/{server.slug}/introspect", data='{"token": "x"}',
                             content_type="application/json", HTTP_AUTHORIZATION=basic_auth(cred.client_id, secret))
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"

    def test_unknown_server_is_404(self, http, credential):
        response = form_post(http, "/oauth/nope/introspect", {"token": "x"})
        assert response.status_code == 404 and response.json()["error"] == "not_found"

    def test_rate_limited_per_credential(self, http, server, credential, settings):
        from django.core.cache import cache

        cache.clear()
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"introspect:credential": (2, 60)}}
        for _ in range(2):
            assert introspect(http, server, credential, "x").status_code == 200
        response = introspect(http, server, credential, "x")
        assert response.status_code == 429 and response["Retry-After"]
        cache.clear()


@pytest.mark.django_db
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(st.tuples(st.sampled_from(["token", "token_type_hint", "client_id", "client_secret"]),
                              st.text(max_size=40)), max_size=5),
    use_credential=st.booleans(),
    content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", ""]),
)
def test_fuzzed_introspection_requests_never_500(client, server, credential, fields, use_credential, content_type):
    from urllib.parse import urlencode

    cred, secret = credential
    headers = {"HTTP_AUTHORIZATION": basic_auth(cred.client_id, secret)} if use_credential else {}
    response = client.post(f"/oauth/{server.slug}/introspect", data=urlencode(fields), content_type=content_type,
                           **headers)
    assert response.status_code in (200, 400, 401, 429), response.content
    body = response.json()
    assert body.get("active") is False or body.get("error") in {"invalid_request", "invalid_client", "slow_down"}


@pytest.mark.django_db
class TestCreateIntrospectionCredentialCommand:
    def test_prints_the_secret_once_and_it_works(self, http, server):
        out = io.StringIO()
        call_command("create_introspection_credential", server.slug, "billing API", stdout=out)
        lines = dict(line.split(":", 1) for line in out.getvalue().splitlines() if line.startswith("client_"))
        client_id, secret = lines["client_id"].strip(), lines["client_secret"].strip()
        credential = IntrospectionCredential.objects.get(client_id=client_id)
        assert credential.server == server and credential.name == "billing API"
        assert secret not in credential.secret_hash
        tokens = issue_tokens(http, server, make_client(server))
        assert introspect(http, server, (credential, secret), tokens["access_token"]).json()["active"] is True

    def test_unknown_slug_fails(self, db):
        from django.core.management.base import CommandError

        with pytest.raises(CommandError):
            call_command("create_introspection_credential", "nope", "x", stdout=io.StringIO())
