"""The upstream wire client (``oauthproxy.upstream.client``), mocked only at the HTTP boundary."""

import base64
import time
from datetime import timedelta
from urllib.parse import unquote

import pytest
import requests
import responses
from django.core.cache import cache
from django.utils import timezone

from oauthproxy.core.exceptions import UpstreamError
from oauthproxy.upstream.client import TokenSet, UpstreamClient, expires_at_from, upstream_nonce
from tests.conftest import make_server
from tests.flows.helpers import SigningKey, form_body, id_token_claims, mock_oidc_discovery, query_of

TOKEN_URL = "https://idp.example.com/token"


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def basic_credentials(request) -> tuple[str, str]:
    scheme, encoded = request.headers["Authorization"].split(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    return user, password


@pytest.mark.django_db
class TestAuthorizationUrl:
    def test_parameters(self, server):
        url = UpstreamClient(server).authorization_url(state="st", code_challenge="ch" * 22)
        assert url.startswith("https://idp.example.com/authorize?")
        params = query_of(url)
        assert params == {
            "response_type": "code",
            "client_id": "proxy-client",
            "redirect_uri": "https://proxy.example.test/oauth/crm/callback",
            "state": "st",
            "scope": "openid email offline_access",
            "code_challenge": "ch" * 22,
            "code_challenge_method": "S256",
            "prompt": "consent",
            "nonce": upstream_nonce("st"),  # an OpenID login
        }

    def test_scopes_are_space_separated_percent_encoded(self, server):
        url = UpstreamClient(server).authorization_url(state="s", code_challenge=None)
        assert "scope=openid%20email%20offline_access" in url

    def test_no_pkce_when_disabled(self, db):
        server = make_server(use_pkce=False)
        params = query_of(UpstreamClient(server).authorization_url(state="s", code_challenge="c" * 43))
        assert "code_challenge" not in params and "code_challenge_method" not in params

    def test_endpoint_query_is_kept_and_extra_params_added(self, db):
        server = make_server(
            authorization_endpoint="https://idp.example.com/authorize?tenant=acme",
            extra_authorize_params={"audience": "https://api.example.com", "access_type": "offline"},
        )
        url = UpstreamClient(server).authorization_url(state="s", code_challenge=None)
        assert url.startswith("https://idp.example.com/authorize?tenant=acme&")
        params = query_of(url)
        assert params["audience"] == "https://api.example.com" and params["access_type"] == "offline"

    def test_prompt_consent_only_with_offline_access(self, db):
        server = make_server(scopes=["openid", "email"])
        assert "prompt" not in query_of(UpstreamClient(server).authorization_url(state="s", code_challenge=None))

    def test_configured_prompt_wins(self, db):
        server = make_server(extra_authorize_params={"prompt": "select_account"})
        params = query_of(UpstreamClient(server).authorization_url(state="s", code_challenge=None))
        assert params["prompt"] == "select_account"

    def test_no_scope_parameter_without_scopes(self, db):
        server = make_server(scopes=[])
        assert "scope" not in query_of(UpstreamClient(server).authorization_url(state="s", code_challenge=None))

    def test_resource_is_never_sent(self, server):
        assert "resource" not in UpstreamClient(server).authorization_url(state="s", code_challenge=None)


@pytest.mark.django_db
class TestCodeExchange:
    def test_client_secret_basic_is_url_encoded_and_not_repeated(self, upstream, db):
        server = make_server(client_id="id with:colon", client_secret="p@ss:w/rd+ü")
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at", "token_type": "Bearer"})
        UpstreamClient(server).exchange_code(code="c0de", code_verifier="v" * 43)
        request = upstream.calls[0].request
        user, password = basic_credentials(request)
        assert user == "id%20with%3Acolon" and unquote(user) == "id with:colon"
        assert password == "p%40ss%3Aw%2Frd%2B%C3%BC" and unquote(password) == "p@ss:w/rd+ü"
        body = form_body(request)
        assert body == {
            "grant_type": "authorization_code",
            "code": "c0de",
            "redirect_uri": "https://proxy.example.test/oauth/crm/callback",
            "code_verifier": "v" * 43,
        }
        assert request.headers["Accept"] == "application/json"
        assert request.req_kwargs["timeout"] == (5, 15)

    def test_client_secret_post(self, upstream, db):
        server = make_server(token_endpoint_auth_methods_supported=["client_secret_post"])
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at"})
        UpstreamClient(server).exchange_code(code="c", code_verifier=None)
        request = upstream.calls[0].request
        assert "Authorization" not in request.headers
        body = form_body(request)
        assert body["client_id"] == "proxy-client" and body["client_secret"] == "upstream-secret-value-123"
        assert "code_verifier" not in body

    def test_public_upstream_client(self, upstream, db):
        server = make_server(token_endpoint_auth_methods_supported=["none"], client_secret="")
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at"})
        UpstreamClient(server).exchange_code(code="c", code_verifier="v" * 43)
        request = upstream.calls[0].request
        assert "Authorization" not in request.headers
        body = form_body(request)
        assert body["client_id"] == "proxy-client" and "client_secret" not in body

    def test_token_set(self, upstream, server):
        upstream.add(
            responses.POST,
            TOKEN_URL,
            json={"access_token": "at", "refresh_token": "rt", "expires_in": "3600", "token_type": "bearer",
                  "scope": ["openid", "email"], "id_token": "x.y.z"},
        )
        tokens = UpstreamClient(server).exchange_code(code="c", code_verifier=None)
        assert tokens == TokenSet(
            access_token="at", token_type="bearer", refresh_token="rt", expires_in=3600, scope="openid email",
            id_token="x.y.z",
        )

    def test_github_style_tokens_without_expiry_or_refresh(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "gho_x", "token_type": "bearer",
                                                      "scope": "read:user"})
        tokens = UpstreamClient(server).exchange_code(code="c", code_verifier=None)
        assert tokens.expires_in is None and tokens.refresh_token == ""

    def test_unparseable_expires_in_is_no_expiry(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at", "expires_in": "soon"})
        assert UpstreamClient(server).exchange_code(code="c", code_verifier=None).expires_in is None

    @pytest.mark.parametrize(
        ("kwargs", "oauth_error", "reason"),
        [
            (dict(status=400, json={"error": "invalid_grant", "error_description": "expired"}), "invalid_grant",
             "upstream answered invalid_grant (expired)"),
            (dict(status=401, json={"error": "invalid_client"}), "server_error", "invalid_client"),
            (dict(status=200, json={"error": "invalid_request"}), "server_error", "invalid_request"),
            (dict(status=403, json={}), "server_error", "http_403"),
            (dict(status=500, body="boom"), "temporarily_unavailable", "HTTP 500"),
            (dict(status=503, json={"error": "x"}), "temporarily_unavailable", "HTTP 503"),
            (dict(status=200, body="<html/>", content_type="text/html"), "server_error", "non-JSON"),
            (dict(status=200, json=["not", "an", "object"]), "server_error", "not an object"),
            (dict(status=200, json={"token_type": "Bearer"}), "server_error", "no access_token"),
            (dict(status=200, json={"access_token": ""}), "server_error", "no access_token"),
            (dict(status=302, headers={"Location": "https://elsewhere.example/"}), "server_error", "non-JSON"),
            (dict(body=requests.Timeout()), "temporarily_unavailable", "timed out"),
            (dict(body=requests.ConnectionError()), "temporarily_unavailable", "cannot connect to idp.example.com"),
            (dict(body=requests.exceptions.InvalidURL()), "server_error", "request failed"),
        ],
    )
    def test_failures(self, upstream, server, kwargs, oauth_error, reason):
        upstream.add(responses.POST, TOKEN_URL, **kwargs)
        with pytest.raises(UpstreamError) as info:
            UpstreamClient(server).exchange_code(code="c", code_verifier=None)
        assert info.value.oauth_error == oauth_error
        assert reason in info.value.reason
        assert info.value.reason.startswith("code exchange")

    def test_oversized_response(self, upstream, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "UPSTREAM_MAX_RESPONSE_BYTES": 100}
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "a" * 500})
        with pytest.raises(UpstreamError, match="larger than 100 bytes"):
            UpstreamClient(server).exchange_code(code="c", code_verifier=None)

    def test_reason_never_contains_the_secret(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_client"})
        with pytest.raises(UpstreamError) as info:
            UpstreamClient(server).exchange_code(code="the-code", code_verifier="the-verifier")
        assert "upstream-secret-value-123" not in info.value.reason
        assert "the-code" not in info.value.reason and "the-verifier" not in info.value.reason

    def test_check_credentials(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
        assert UpstreamClient(server).check_credentials() == "invalid_grant"


@pytest.mark.django_db
class TestRefreshAndRevoke:
    def test_refresh(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "new", "refresh_token": "rt2"})
        tokens = UpstreamClient(server).refresh(refresh_token="rt1")
        assert (tokens.access_token, tokens.refresh_token) == ("new", "rt2")
        assert form_body(upstream.calls[0].request) == {"grant_type": "refresh_token", "refresh_token": "rt1"}

    def test_refresh_invalid_grant(self, upstream, server):
        upstream.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
        with pytest.raises(UpstreamError) as info:
            UpstreamClient(server).refresh(refresh_token="rt")
        assert info.value.oauth_error == "invalid_grant" and info.value.reason.startswith("token refresh")

    def test_revoke_without_endpoint_does_nothing(self, upstream, server):
        assert UpstreamClient(server).revoke(token="t", token_type_hint="access_token") is False
        assert not upstream.calls

    def test_revoke_basic(self, upstream, db):
        server = make_server(revocation_endpoint="https://idp.example.com/revoke")
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        assert UpstreamClient(server).revoke(token="t", token_type_hint="refresh_token") is True
        request = upstream.calls[0].request
        assert basic_credentials(request) == ("proxy-client", "upstream-secret-value-123")
        assert form_body(request) == {"token": "t", "token_type_hint": "refresh_token"}

    def test_revoke_post(self, upstream, db):
        server = make_server(
            revocation_endpoint="https://idp.example.com/revoke",
            token_endpoint_auth_methods_supported=["client_secret_post"],
        )
        upstream.add(responses.POST, server.revocation_endpoint, status=200)
        UpstreamClient(server).revoke(token="t", token_type_hint="access_token")
        body = form_body(upstream.calls[0].request)
        assert body["client_id"] == "proxy-client" and body["client_secret"] == "upstream-secret-value-123"

    @pytest.mark.parametrize("kwargs", [dict(status=400), dict(body=requests.Timeout())])
    def test_revoke_failure_is_false(self, upstream, db, kwargs):
        server = make_server(revocation_endpoint="https://idp.example.com/revoke")
        upstream.add(responses.POST, server.revocation_endpoint, **kwargs)
        assert UpstreamClient(server).revoke(token="t", token_type_hint="access_token") is False


@pytest.mark.django_db
class TestIdentity:
    def test_userinfo(self, upstream, db):
        server = make_server(userinfo_endpoint="https://idp.example.com/userinfo")
        upstream.add(responses.GET, server.userinfo_endpoint, json={"sub": "u1"})
        assert UpstreamClient(server).userinfo(access_token="at") == {"sub": "u1"}
        assert upstream.calls[0].request.headers["Authorization"] == "Bearer at"

    def test_userinfo_refused(self, upstream, db):
        server = make_server(userinfo_endpoint="https://idp.example.com/userinfo")
        upstream.add(responses.GET, server.userinfo_endpoint, status=401)
        with pytest.raises(UpstreamError, match="userinfo: HTTP 401"):
            UpstreamClient(server).userinfo(access_token="at")

    def test_provider_metadata_is_cached(self, upstream, db):
        server = make_server(issuer="https://idp.example.com")
        mock_oidc_discovery(upstream, server, SigningKey())
        client = UpstreamClient(server)
        assert client.provider_metadata()["jwks_uri"] == "https://idp.example.com/jwks"
        fetched = len(upstream.calls)
        client.provider_metadata()
        assert len(upstream.calls) == fetched

    def test_provider_metadata_tries_rfc8414_path_insertion_first(self, upstream, db):
        server = make_server(issuer="https://idp.example.com/realms/acme")
        upstream.add(
            responses.GET,
            "https://idp.example.com/.well-known/oauth-authorization-server/realms/acme",
            json={"issuer": "https://idp.example.com/realms/acme", "authorization_endpoint": "https://idp.example.com/a",
                  "token_endpoint": "https://idp.example.com/t"},
        )
        assert UpstreamClient(server).provider_metadata()["issuer"] == "https://idp.example.com/realms/acme"
        assert [call.request.url for call in upstream.calls] == [
            "https://idp.example.com/.well-known/oauth-authorization-server/realms/acme"
        ]

    def test_provider_metadata_naming_another_issuer_is_refused(self, upstream, db):
        """The ID token keys come from this document: one that names another issuer is not used."""
        server = make_server(issuer="https://idp.example.com")
        upstream.add(
            responses.GET,
            "https://idp.example.com/.well-known/oauth-authorization-server",
            json={"issuer": "https://evil.example.com", "authorization_endpoint": "https://evil.example.com/a",
                  "token_endpoint": "https://evil.example.com/t", "jwks_uri": "https://evil.example.com/jwks"},
        )
        with pytest.raises(UpstreamError, match="names the issuer 'https://evil.example.com'"):
            UpstreamClient(server).provider_metadata()

    def test_provider_metadata_failure(self, upstream, db):
        server = make_server(issuer="https://idp.example.com")
        upstream.add(responses.GET, "https://idp.example.com/.well-known/openid-configuration", status=500)
        upstream.add(responses.GET, "https://idp.example.com/.well-known/oauth-authorization-server", status=404)
        with pytest.raises(UpstreamError, match="upstream discovery failed"):
            UpstreamClient(server).provider_metadata()


@pytest.mark.django_db
class TestIdTokens:
    @pytest.fixture
    def oidc_server(self, db):
        return make_server(issuer="https://idp.example.com")

    def test_verified_with_the_upstream_jwks(self, upstream, oidc_server):
        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        claims = id_token_claims(oidc_server, sub="alice", email="a@example.com")
        assert UpstreamClient(oidc_server).id_token_claims(id_token=key.sign(claims))["sub"] == "alice"

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (dict(aud="another-client"), "Audience"),
            (dict(iss="https://evil.example"), "issuer"),
            (dict(exp=int(time.time()) - 3600), "expired"),
            (dict(sub=None), "sub"),
        ],
    )
    def test_bad_claims(self, upstream, oidc_server, change, message):
        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        token = key.sign(id_token_claims(oidc_server, **change))
        with pytest.raises(UpstreamError, match=message) as info:
            UpstreamClient(oidc_server).id_token_claims(id_token=token)
        assert info.value.reason.startswith("id_token rejected")

    @pytest.mark.parametrize(
        "change",
        [
            lambda server: dict(aud=[server.client_id, "another-client"]),  # several audiences, no azp
            lambda server: dict(aud=[server.client_id, "another-client"], azp="another-client"),
            lambda server: dict(azp="another-client"),
        ],
        ids=["several-audiences-no-azp", "several-audiences-other-azp", "other-azp"],
    )
    def test_a_token_for_another_authorized_party_is_refused(self, upstream, oidc_server, change):
        """Issue 13, finding 10: ``azp`` is checked when the ID token has several audiences."""
        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        token = key.sign(id_token_claims(oidc_server, **change(oidc_server)))
        with pytest.raises(UpstreamError, match="azp"):
            UpstreamClient(oidc_server).id_token_claims(id_token=token)

    def test_several_audiences_with_our_azp_are_accepted(self, upstream, oidc_server):
        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        audiences = [oidc_server.client_id, "api"]
        claims = id_token_claims(oidc_server, sub="alice", aud=audiences, azp=oidc_server.client_id)
        assert UpstreamClient(oidc_server).id_token_claims(id_token=key.sign(claims))["sub"] == "alice"

    def test_the_nonce_must_be_this_logins(self, upstream, oidc_server):
        """Issue 13, finding 10: OpenID logins send a nonce and the ID token must carry it."""
        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        client = UpstreamClient(oidc_server)
        nonce = query_of(client.authorization_url(state="st", code_challenge=None))["nonce"]
        assert nonce == upstream_nonce("st") != upstream_nonce("other")
        good = key.sign(id_token_claims(oidc_server, sub="alice", nonce=nonce))
        assert client.id_token_claims(id_token=good, nonce=nonce)["sub"] == "alice"
        for claims in (id_token_claims(oidc_server), id_token_claims(oidc_server, nonce=upstream_nonce("other"))):
            with pytest.raises(UpstreamError, match="nonce"):
                client.id_token_claims(id_token=key.sign(claims), nonce=nonce)

    def test_forged_signature(self, upstream, oidc_server):
        mock_oidc_discovery(upstream, oidc_server, SigningKey(kid="k1"))
        forged = SigningKey(kid="k1").sign(id_token_claims(oidc_server))
        with pytest.raises(UpstreamError, match="Signature verification failed"):
            UpstreamClient(oidc_server).id_token_claims(id_token=forged)

    def test_alg_none_is_refused(self, upstream, oidc_server):
        import jwt

        mock_oidc_discovery(upstream, oidc_server, SigningKey())
        unsigned = jwt.encode(id_token_claims(oidc_server), key=None, algorithm="none")
        with pytest.raises(UpstreamError, match="id_token"):
            UpstreamClient(oidc_server).id_token_claims(id_token=unsigned)

    def test_hs256_with_the_public_key_is_refused(self, upstream, oidc_server):
        """Algorithm confusion: an HS256 token MACed with the RSA public key must not verify."""
        import hashlib
        import hmac
        import json

        from cryptography.hazmat.primitives import serialization

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        key = SigningKey()
        mock_oidc_discovery(upstream, oidc_server, key)
        public_pem = key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
        payload = b64(json.dumps(id_token_claims(oidc_server)).encode())
        signature = b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        with pytest.raises(UpstreamError):
            UpstreamClient(oidc_server).id_token_claims(id_token=f"{header}.{payload}.{signature}")

    def test_key_rotation_refetches_the_jwks_once(self, upstream, oidc_server):
        old, new = SigningKey(kid="old"), SigningKey(kid="new")
        jwks_uri = mock_oidc_discovery(upstream, oidc_server, old)
        client = UpstreamClient(oidc_server)
        client.id_token_claims(id_token=old.sign(id_token_claims(oidc_server)))
        upstream.replace(responses.GET, jwks_uri, json=new.jwks())
        assert client.id_token_claims(id_token=new.sign(id_token_claims(oidc_server, sub="bob")))["sub"] == "bob"
        assert len([c for c in upstream.calls if c.request.url == jwks_uri]) == 2

    def test_unknown_key_after_refetch(self, upstream, oidc_server):
        mock_oidc_discovery(upstream, oidc_server, SigningKey(kid="a"))
        with pytest.raises(UpstreamError, match="unknown key"):
            UpstreamClient(oidc_server).id_token_claims(
                id_token=SigningKey(kid="b").sign(id_token_claims(oidc_server))
            )

    def test_without_issuer_the_token_endpoint_answer_is_trusted(self, server):
        key = SigningKey()
        ok = key.sign({"sub": "s1", "aud": "proxy-client"})
        assert UpstreamClient(server).id_token_claims(id_token=ok)["sub"] == "s1"
        with pytest.raises(UpstreamError, match="sub"):
            UpstreamClient(server).id_token_claims(id_token=key.sign({"aud": "proxy-client"}))

    def test_without_issuer_audience_is_still_checked(self, server):
        key = SigningKey()
        with pytest.raises(UpstreamError, match="Audience"):
            UpstreamClient(server).id_token_claims(id_token=key.sign({"sub": "s1", "aud": "other"}))

    def test_garbage(self, server):
        with pytest.raises(UpstreamError, match="id_token rejected"):
            UpstreamClient(server).id_token_claims(id_token="garbage")


def test_expires_at_from():
    assert expires_at_from(None) is None
    assert expires_at_from(0) is None
    expected = timezone.now() + timedelta(seconds=60)
    assert abs((expires_at_from(60) - expected).total_seconds()) < 2
