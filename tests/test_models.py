import pytest
from django.core.exceptions import ValidationError

from oauthproxy.models import McpServer
from tests.conftest import make_server


def errors_of(**overrides) -> dict:
    with pytest.raises(ValidationError) as info:
        make_server(**overrides)
    return info.value.message_dict


@pytest.mark.django_db
class TestServerValidation:
    def test_valid_server_has_urls_under_public_base(self, server):
        assert server.issuer_url == "https://proxy.example.test/oauth/crm"
        assert server.callback_url == "https://proxy.example.test/oauth/crm/callback"
        assert server.resource_url == "https://proxy.example.test/mcp/crm"
        assert (
            server.resource_metadata_url
            == "https://proxy.example.test/.well-known/oauth-protected-resource/mcp/crm"
        )

    @pytest.mark.parametrize("slug", ["CRM", "crm tools", "-crm", "crm-", "crm/x", "", "a" * 65])
    def test_bad_slugs_are_refused_with_a_message(self, slug):
        assert "slug" in errors_of(slug=slug)

    def test_http_endpoint_refused_outside_debug(self):
        errors = errors_of(token_endpoint="http://idp.example.com/token")
        assert "https://" in errors["token_endpoint"][0]

    def test_http_on_loopback_is_allowed(self, db):
        server = make_server(token_endpoint="http://127.0.0.1:9000/token")
        assert server.pk

    def test_http_allowed_in_debug(self, settings, db):
        settings.DEBUG = True
        assert make_server(authorization_endpoint="http://idp.internal/authorize").pk

    def test_unknown_auth_method_is_named(self):
        errors = errors_of(token_endpoint_auth_methods_supported=["private_key_jwt"])
        assert "private_key_jwt" in errors["token_endpoint_auth_methods_supported"][0]

    def test_secret_required_unless_public_upstream_client(self, db):
        assert "client_secret" in errors_of(client_secret="")
        assert make_server(client_secret="", token_endpoint_auth_methods_supported=["none"]).pk

    def test_reserved_authorize_params_cannot_be_overridden(self):
        errors = errors_of(extra_authorize_params={"redirect_uri": "https://evil.example"})
        assert "redirect_uri" in errors["extra_authorize_params"][0]

    def test_scopes_must_be_a_list_of_words(self):
        assert "scopes" in errors_of(scopes="openid email")

    def test_first_supported_method_is_used(self, db):
        server = make_server(token_endpoint_auth_methods_supported=["client_secret_post", "client_secret_basic"])
        assert server.upstream_auth_method == "client_secret_post"
        assert McpServer(token_endpoint_auth_methods_supported=[]).upstream_auth_method == "client_secret_basic"

    def test_lifetimes_fall_back_to_deployment_defaults(self, db, settings):
        server = make_server()
        assert server.effective_access_token_lifetime == settings.OAUTHPROXY["ACCESS_TOKEN_LIFETIME"]
        server.access_token_lifetime = 120
        assert server.effective_access_token_lifetime == 120
