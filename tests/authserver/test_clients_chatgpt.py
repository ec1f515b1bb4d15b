"""ChatGPT (connectors / apps): a Client ID Metadata Document at chatgpt.com that prefers ``private_key_jwt``
(an RS256 key set at its ``jwks_uri``) and also lists ``none``; redirect URI
``https://chatgpt.com/connector_platform_oauth_redirect``; ``resource`` sent on every request.

Also the ``private_key_jwt`` rules (RFC 7523): signature by the document's keys, audience, lifetime, and
``jti`` replay refused.
"""

import pytest
import responses

from oauthproxy.models import Client
from tests.authserver.clients import client_assertion, connect, consent_page, new_key, serve_document
from tests.factories import form_post

CLIENT_ID = "https://chatgpt.com/oauth/tU1UVEq8rRTK/client.json"
JWKS_URI = "https://chatgpt.com/oauth/tU1UVEq8rRTK/jwks.json"
REDIRECT_URI = "https://chatgpt.com/connector_platform_oauth_redirect"


def chatgpt_document(**overrides) -> dict:
    document = {
        "client_id": CLIENT_ID,
        "client_name": "ChatGPT",
        "client_uri": "https://chatgpt.com",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "jwks_uri": JWKS_URI,
    }
    document.update(overrides)
    return {name: value for name, value in document.items() if value is not None}


@pytest.fixture
def key():
    return new_key()


@pytest.fixture
def outside(key):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        serve_document(mock, chatgpt_document(), jwks=key.jwks())
        yield mock


def assertion_auth(key, server, **claims):
    return lambda: {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(key, client_id=CLIENT_ID, audience=f"{server.issuer_url}/token",
                                             **claims),
    }


def token_request(http, server, data):
    return form_post(http, f"/oauth/{server.slug}/token", data)


@pytest.mark.django_db
class TestChatGPT:
    def test_document_is_accepted_with_private_key_jwt(self, client, server, outside, key):
        page = consent_page(client, server, _resolved(client, server), redirect_uri=REDIRECT_URI,
                            resource=server.resource_url)
        assert "Known: ChatGPT (by metadata document)" in page
        row = Client.objects.get(client_id=CLIENT_ID)
        assert row.token_endpoint_auth_method == "private_key_jwt"
        assert row.metadata["jwks_uri"] == JWKS_URI

    def test_full_sequence_with_client_assertions(self, client, server, outside, key):
        _resolved(client, server)
        result = connect(client, server, CLIENT_ID, redirect_uri=REDIRECT_URI, resource=server.resource_url,
                         token_auth=assertion_auth(key, server))
        assert result["query"]["iss"] == server.issuer_url
        assert result["tokens"]["token_type"] == "Bearer"
        assert result["refreshed"]["access_token"] != result["tokens"]["access_token"]
        jwks_fetches = [call for call in outside.calls if call.request.url == JWKS_URI]
        assert len(jwks_fetches) == 1  # cached between the two token requests

    def test_public_auth_is_accepted_as_the_document_lists_none(self, client, server, outside):
        _resolved(client, server)
        connect(client, server, CLIENT_ID, redirect_uri=REDIRECT_URI, token_auth={"client_id": CLIENT_ID})

    def test_without_none_an_assertion_is_required(self, client, server, key):
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            serve_document(mock, chatgpt_document(token_endpoint_auth_methods_supported=["private_key_jwt"]),
                           jwks=key.jwks())
            _resolved(client, server)
            with pytest.raises(AssertionError, match="invalid_client"):
                connect(client, server, CLIENT_ID, redirect_uri=REDIRECT_URI, token_auth={"client_id": CLIENT_ID})

    def test_metadata_advertises_private_key_jwt(self, client, server):
        doc = client.get(f"/.well-known/oauth-authorization-server/oauth/{server.slug}").json()
        assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]


@pytest.mark.django_db
class TestClientAssertionRules:
    """Each rule of RFC 7523 §3 the proxy enforces, at the token endpoint (refresh with a real grant)."""

    @pytest.fixture
    def refresh_token(self, client, server, outside, key):
        _resolved(client, server)
        result = connect(client, server, CLIENT_ID, redirect_uri=REDIRECT_URI, token_auth=assertion_auth(key, server))
        return result["refreshed"]["refresh_token"]

    def refresh_with(self, http, server, refresh_token, assertion):
        return token_request(http, server, {
            "grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        })

    def test_replayed_jti_is_refused(self, client, server, key, refresh_token):
        assertion = assertion_auth(key, server)()["client_assertion"]
        first = self.refresh_with(client, server, refresh_token, assertion)
        assert first.status_code == 200
        again = self.refresh_with(client, server, first.json()["refresh_token"], assertion)
        assert again.status_code == 401 and again.json()["error"] == "invalid_client"
        assert "jti" in again.json()["error_description"]

    def test_another_key_is_refused(self, client, server, refresh_token):
        forged = client_assertion(new_key(), client_id=CLIENT_ID, audience=f"{server.issuer_url}/token")
        response = self.refresh_with(client, server, refresh_token, forged)
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"

    @pytest.mark.parametrize("audience", ["https://other.example/token", "https://proxy.example.test/oauth/x/token"])
    def test_wrong_audience_is_refused(self, client, server, key, refresh_token, audience):
        response = self.refresh_with(client, server, refresh_token,
                                     client_assertion(key, client_id=CLIENT_ID, audience=audience))
        assert response.status_code == 401 and "aud" in response.json()["error_description"]

    def test_the_issuer_is_an_accepted_audience(self, client, server, key, refresh_token):
        response = self.refresh_with(client, server, refresh_token,
                                     client_assertion(key, client_id=CLIENT_ID, audience=server.issuer_url))
        assert response.status_code == 200

    @pytest.mark.parametrize("claims", [
        {"exp": 1000},  # expired
        {"exp": 10**10},  # too far ahead
        {"jti": None},  # no jti
        {"iss": "https://evil.example/client.json"},  # iss is not the client
    ])
    def test_bad_claims_are_refused(self, client, server, key, refresh_token, claims):
        assertion = client_assertion(key, client_id=CLIENT_ID, audience=f"{server.issuer_url}/token", **claims)
        response = self.refresh_with(client, server, refresh_token, assertion)
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"

    def test_unsigned_and_hmac_assertions_are_refused(self, client, server, refresh_token):
        import jwt

        claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": f"{server.issuer_url}/token", "exp": 2**31 - 1,
                  "jti": "x"}
        for token in (jwt.encode(claims, None, algorithm="none"), jwt.encode(claims, "k" * 32, algorithm="HS256")):
            response = self.refresh_with(client, server, refresh_token, token)
            assert response.status_code == 401 and response.json()["error"] == "invalid_client"

    def test_a_secret_and_an_assertion_together_are_refused(self, client, server, key, refresh_token):
        response = token_request(client, server, {
            "grant_type": "refresh_token", "refresh_token": refresh_token, "client_secret": "x",
            **assertion_auth(key, server)(),
        })
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"


def _resolved(http, server) -> Client:
    """ChatGPT's first authorize makes the proxy fetch the document; answers the client row."""
    from oauthproxy.authserver.cimd import client_resolve

    return client_resolve(server=server, client_id=CLIENT_ID)
