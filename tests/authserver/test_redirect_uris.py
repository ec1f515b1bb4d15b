import pytest

from oauthproxy.authserver.redirect_uris import (
    MAX_REDIRECT_URIS,
    redirect_uri_matches,
    redirect_uri_validate,
    redirect_uris_validate,
)
from oauthproxy.core.exceptions import InvalidRedirectUri
from oauthproxy.models import Client

# What real MCP clients register.
ACCEPTED = [
    "https://claude.ai/api/mcp/auth_callback",
    "https://chatgpt.com/connector_platform_oauth_redirect",
    "https://vscode.dev/redirect",
    "http://localhost/",  # VS Code: any port at request time
    "http://127.0.0.1:33418/",
    "http://localhost:6274/oauth/callback",  # MCP Inspector
    "http://127.0.0.1:54545/callback",  # MCP SDKs' loopback listener
    "http://[::1]:8080/callback",
    "https://app.example.com/cb?tenant=a",
    "com.example.app:/oauth2redirect",  # RFC 8252 §7.1
    "com.googleusercontent.apps.123:/oauth2redirect",
    "com.example.app://callback/path",
]

REFUSED = [
    ("javascript:alert(1)", "javascript: scheme"),
    ("javascript://example.com/%0aalert(1)", "javascript: scheme"),
    ("data:text/html,<script>alert(1)</script>", "data: scheme"),
    ("file:///etc/passwd", "file: scheme"),
    ("vbscript:msgbox(1)", "vbscript: scheme"),
    ("https://app.example.com/cb#frag", "fragment"),
    ("https://app.example.com/cb#", "fragment"),
    ("https://user@app.example.com/cb", "userinfo"),
    ("https://user:pass@app.example.com/cb", "userinfo"),
    ("http://app.example.com/cb", "non-loopback"),
    ("http://127.0.0.2/cb", "non-loopback"),
    ("http://localhost.evil.example/cb", "non-loopback"),
    ("myapp://callback", "reverse-domain"),
    ("/relative/callback", "absolute"),
    ("callback", "absolute"),
    ("https:/app.example.com/cb", "no host"),
    ("https://app.example.com/c b", "whitespace"),
    ("https://app.example.com/cb\x00", "control"),
    ("https://app.example.com:99999/cb", "not a valid URI"),
    ("com.example.app:callback", "not a valid URI"),
    ("https://" + "a" * 2000 + ".example/cb", "longer than"),
    ("", "non-empty"),
]


@pytest.mark.parametrize("uri", ACCEPTED)
def test_uris_real_clients_register_are_accepted(uri):
    redirect_uri_validate(uri)


@pytest.mark.parametrize(("uri", "reason"), REFUSED)
def test_forbidden_uris_are_refused_with_a_reason(uri, reason):
    with pytest.raises(InvalidRedirectUri) as info:
        redirect_uri_validate(uri)
    assert info.value.error == "invalid_redirect_uri"
    assert reason in info.value.description


def test_non_string_is_refused():
    with pytest.raises(InvalidRedirectUri):
        redirect_uri_validate(42)


def test_cursor_scheme_is_accepted_by_default_and_can_be_withdrawn(settings):
    redirect_uri_validate("cursor://anysphere.cursor-retrieval/oauth/callback")
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "REDIRECT_URI_EXTRA_SCHEMES": []}
    with pytest.raises(InvalidRedirectUri, match="reverse-domain"):
        redirect_uri_validate("cursor://anysphere.cursor-retrieval/oauth/callback")


def test_operator_can_allow_a_single_word_scheme(settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "REDIRECT_URI_EXTRA_SCHEMES": ["myapp"]}
    redirect_uri_validate("myapp://callback")
    with pytest.raises(InvalidRedirectUri):  # never script schemes, whatever the operator lists
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "REDIRECT_URI_EXTRA_SCHEMES": ["javascript"]}
        redirect_uri_validate("javascript:alert(1)")


class TestListValidation:
    @pytest.mark.parametrize("value", [None, [], "https://app.example.com/cb", {"a": 1}])
    def test_a_non_empty_array_is_required(self, value):
        with pytest.raises(InvalidRedirectUri):
            redirect_uris_validate(value)

    def test_too_many_are_refused(self):
        uris = [f"https://app.example.com/cb{i}" for i in range(MAX_REDIRECT_URIS + 1)]
        with pytest.raises(InvalidRedirectUri):
            redirect_uris_validate(uris)

    def test_duplicates_are_dropped_in_order(self):
        uris = ["https://b.example/cb", "https://a.example/cb", "https://b.example/cb"]
        assert redirect_uris_validate(uris) == ["https://b.example/cb", "https://a.example/cb"]

    def test_one_bad_uri_refuses_the_list(self):
        with pytest.raises(InvalidRedirectUri):
            redirect_uris_validate(["https://ok.example/cb", "javascript:alert(1)"])


class TestMatching:
    @pytest.mark.parametrize(
        ("registered", "requested"),
        [
            ("http://127.0.0.1/callback", "http://127.0.0.1:5555/callback"),
            ("http://127.0.0.1:3000/callback", "http://127.0.0.1:51234/callback"),
            ("http://localhost:3000/callback", "http://localhost:61000/callback"),
            ("http://[::1]:3000/callback", "http://[::1]:4000/callback"),
            ("http://localhost/", "http://localhost:33418/"),
        ],
    )
    def test_loopback_port_may_differ(self, registered, requested):
        assert redirect_uri_matches([registered], requested)

    @pytest.mark.parametrize(
        ("registered", "requested"),
        [
            ("http://localhost:3000/callback", "http://127.0.0.1:3000/callback"),  # host
            ("http://localhost:3000/callback", "http://localhost:3000/callback/x"),  # path
            ("http://localhost:3000/callback", "http://localhost:3000/Callback"),  # path case
            ("http://localhost:3000/callback", "http://localhost:3000/callback?x=1"),  # query added
            ("http://localhost:3000/callback?x=1", "http://localhost:3000/callback?x=2"),  # query changed
            ("http://localhost:3000/callback", "http://localhost:3000/callback?"),  # empty query
            ("http://localhost:3000/callback", "https://localhost:3000/callback"),  # scheme
            ("http://localhost:3000/callback", "http://user@localhost:3001/callback"),  # userinfo
            ("http://localhost:3000/callback", "http://localhost:3001/callback#x"),  # fragment
            ("http://localhost:3000/callback", "http://localhost:abc/callback"),  # broken port
            ("https://localhost:3000/callback", "https://localhost:3001/callback"),  # https: exact
            ("https://app.example.com:8443/cb", "https://app.example.com:8444/cb"),
            ("https://app.example.com/cb", "https://app.example.com/cb/"),
            ("https://app.example.com/cb", "https://app.example.com.evil.example/cb"),
            ("com.example.app:/cb", "com.example.app:/cb2"),
        ],
    )
    def test_everything_else_must_match_exactly(self, registered, requested):
        assert not redirect_uri_matches([registered], requested)

    def test_exact_match_among_several(self):
        registered = ["https://app.example.com/cb", "com.example.app:/cb"]
        assert redirect_uri_matches(registered, "com.example.app:/cb")
        assert redirect_uri_matches(registered, "https://app.example.com/cb")

    @pytest.mark.parametrize("requested", [None, "", 5])
    def test_garbage_never_matches(self, requested):
        assert not redirect_uri_matches(["https://app.example.com/cb"], requested)

    def test_nothing_registered_matches_nothing(self):
        assert not redirect_uri_matches([], "http://127.0.0.1:3000/cb")


@pytest.mark.django_db
def test_client_model_accepts_its_private_use_scheme(server):
    client = Client(
        server=server,
        client_type=Client.CLIENT_PUBLIC,
        authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE,
        redirect_uris="com.example.app:/cb http://127.0.0.1/cb",
    )
    assert "com.example.app" in client.get_allowed_schemes()
    client.full_clean(exclude=["client_secret"])
    client.redirect_uris = "myapp:/cb"
    assert "myapp" not in client.get_allowed_schemes()
