"""The desktop and developer MCP clients, each replayed as it registers and connects (documented values):

- VS Code: DCR with ``https://vscode.dev/redirect``, ``https://insiders.vscode.dev/redirect`` and loopback
  ``http://127.0.0.1/`` / ``http://127.0.0.1:33418/``; asks for ``device_code`` too (dropped); authorizes with
  a loopback port of the moment.
- Cursor: DCR with ``cursor://anysphere.cursor-mcp/oauth/callback`` (and its hosted agents' callback).
- Gemini CLI: DCR with ``http://localhost:7777/oauth/callback``.
- MCP Inspector: DCR with ``http://localhost:6274/oauth/callback`` (and ``/debug``), ``client_secret_basic``
  unless told otherwise... here as the SDK default it sends: ``none``.
- Goose and Zed: DCR with a loopback redirect on a port of the moment.
- Metadata documents (public, loopback redirects on a port of the moment): Codex under
  ``https://chatgpt.com/oauth/codex/``, VS Code (and Insiders) ``https://vscode.dev/oauth/client-metadata.json``,
  Zed ``https://zed.dev/oauth/client-metadata.json`` (tried before DCR), Goose
  ``https://goose-docs.ai/oauth/client-metadata.json`` (goose 1.32 and later).
"""

import pytest
import responses

from oauthproxy.authserver.cimd import client_resolve
from oauthproxy.authserver.known_clients import client_known
from oauthproxy.models import Client
from tests.authserver.clients import connect, register, serve_document

DCR_CLIENTS = {
    "vscode": (
        {"client_name": "Visual Studio Code", "grant_types": ["authorization_code", "refresh_token",
                                                              "urn:ietf:params:oauth:grant-type:device_code"],
         "redirect_uris": ["https://insiders.vscode.dev/redirect", "https://vscode.dev/redirect",
                           "http://127.0.0.1/", "http://127.0.0.1:33418/"],
         "token_endpoint_auth_method": "none", "response_types": ["code"]},
        "http://127.0.0.1:59656/", "Visual Studio Code",
    ),
    "cursor": (
        {"client_name": "Cursor", "redirect_uris": ["cursor://anysphere.cursor-mcp/oauth/callback",
                                                    "https://www.cursor.com/agents/mcp/oauth/callback"],
         "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]},
        "cursor://anysphere.cursor-mcp/oauth/callback", "Cursor",
    ),
    "gemini-cli": (
        {"client_name": "Gemini CLI MCP Client", "redirect_uris": ["http://localhost:7777/oauth/callback"],
         "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]},
        "http://localhost:7777/oauth/callback", "Gemini CLI",
    ),
    "mcp-inspector": (
        {"client_name": "MCP Inspector", "redirect_uris": ["http://localhost:6274/oauth/callback",
                                                           "http://localhost:6274/oauth/callback/debug"],
         "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"],
         "scope": "mcp"},
        "http://localhost:6274/oauth/callback", "MCP Inspector",
    ),
    "goose": (
        {"client_name": "goose", "redirect_uris": ["http://localhost:51234/oauth_callback"],
         "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]},
        "http://localhost:51234/oauth_callback", "Goose",
    ),
    "zed": (
        {"client_name": "Zed", "redirect_uris": ["http://127.0.0.1:40123/mcp/oauth/callback"],
         "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]},
        "http://127.0.0.1:40123/mcp/oauth/callback", "Zed",
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("key", sorted(DCR_CLIENTS))
def test_registers_and_connects(client, server, key):
    registration, redirect_uri, known_as = DCR_CLIENTS[key]
    registered = register(client, server, registration)
    assert registered["grant_types"] == ["authorization_code", "refresh_token"]
    row = Client.objects.get(client_id=registered["client_id"])
    assert client_known(row).entry.name == known_as
    result = connect(client, server, registered["client_id"], redirect_uri=redirect_uri,
                     scope=registration.get("scope"), resource=server.resource_url)
    assert result["query"]["state"] and result["query"]["iss"] == server.issuer_url
    assert set(result["tokens"]["scope"].split()) <= set(server.scopes)


METADATA_CLIENTS = {
    "codex": ("https://chatgpt.com/oauth/codex/client.json", "http://localhost/callback",
              "http://localhost:1455/callback", "Codex"),
    "vscode": ("https://vscode.dev/oauth/client-metadata.json", "http://127.0.0.1:33418/",
               "http://127.0.0.1:33418/", "Visual Studio Code"),
    "vscode-insiders": ("https://insiders.vscode.dev/oauth/client-metadata.json", "http://127.0.0.1:33418/",
                        "http://127.0.0.1:33418/", "Visual Studio Code"),
    "zed": ("https://zed.dev/oauth/client-metadata.json", "http://127.0.0.1/callback",
            "http://127.0.0.1:27523/callback", "Zed"),
    "goose": ("https://goose-docs.ai/oauth/client-metadata.json", "http://127.0.0.1/oauth_callback",
              "http://127.0.0.1:51234/oauth_callback", "Goose"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("key", sorted(METADATA_CLIENTS))
def test_metadata_document_clients_are_known_and_connect(client, server, key):
    url, registered_redirect, redirect_uri, known_as = METADATA_CLIENTS[key]
    document = {"client_id": url, "client_name": known_as, "redirect_uris": [registered_redirect],
                "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                "token_endpoint_auth_method": "none"}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        serve_document(mock, document)
        row = client_resolve(server=server, client_id=url)
        assert client_known(row).entry.name == known_as
        result = connect(client, server, url, redirect_uri=redirect_uri, resource=server.resource_url)
        assert result["query"]["iss"] == server.issuer_url and result["tokens"]["access_token"]


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["https://zed.dev/extensions/someone/client.json", "https://example.org/cc.json"])
def test_a_metadata_document_elsewhere_is_no_known_client(client, server, url):
    """Only the clients' own document paths are vouched for: neither another page on their hosts nor a
    document elsewhere listing their loopback or vendor redirect URIs passes for them."""
    document = {"client_id": url, "client_name": "Zed",
                "redirect_uris": ["http://127.0.0.1/callback", "https://claude.ai/api/mcp/auth_callback"],
                "grant_types": ["authorization_code"], "response_types": ["code"],
                "token_endpoint_auth_method": "none"}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        serve_document(mock, document)
        row = client_resolve(server=server, client_id=url)
        assert client_known(row) is None
