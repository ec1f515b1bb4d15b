"""The catalog of known MCP clients shipped with the proxy, and how a client row is recognised as one.

Each entry lists what the client's own documentation (and public bug threads about it) says it sends: the
URL prefixes of its Client ID Metadata Documents and the redirect URIs it registers. A client is *known*
when:

- its ``client_id`` is a metadata-document URL under one of an entry's prefixes (proven: the proxy
  fetched the document from that host), or
- every redirect URI it registered is one of an entry's ``redirect_uris`` (exactly, at least one of them)
  or, for entries with ``loopback_paths``, a loopback URI (RFC 8252 §7.3, any port) with one of those
  paths; or, failing that, all are such loopback URIs (the first entry with that path is named). Redirect
  URIs on a vendor's https host bind the authorization code to that vendor; loopback ones only say which
  program is likely asking (any local program can use them), which the admin and consent page show as
  "known" with the basis for it.

The admission policy of a server (``McpServer.client_admission``) uses this to admit "known clients and
pre-registered ones only". Update the catalog when a client changes its registration.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

from oauthproxy.models import Client, McpServer

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class KnownClient:
    key: str
    name: str
    metadata_url_prefixes: tuple[str, ...] = ()
    redirect_uris: tuple[str, ...] = ()
    loopback_paths: tuple[str, ...] = ()
    registers_with: str = ""  # how it connects: "cimd", "dcr", "preregistered" (in order of preference)


KNOWN_CLIENTS: tuple[KnownClient, ...] = (
    KnownClient(
        key="claude",
        name="Claude (claude.ai, Claude Desktop)",
        metadata_url_prefixes=("https://claude.ai/oauth/", "https://claude.com/oauth/"),
        redirect_uris=("https://claude.ai/api/mcp/auth_callback", "https://claude.com/api/mcp/auth_callback"),
        registers_with="cimd dcr preregistered",
    ),
    KnownClient(
        key="claude-code",
        name="Claude Code",
        metadata_url_prefixes=("https://claude.ai/oauth/claude-code-client-metadata",),
        loopback_paths=("/callback",),
        registers_with="cimd dcr preregistered",
    ),
    KnownClient(
        key="chatgpt",
        name="ChatGPT",
        metadata_url_prefixes=("https://chatgpt.com/oauth/",),
        redirect_uris=("https://chatgpt.com/connector_platform_oauth_redirect",),
        registers_with="cimd dcr preregistered",
    ),
    KnownClient(
        key="codex",
        name="Codex",
        metadata_url_prefixes=("https://chatgpt.com/oauth/codex/",),
        loopback_paths=("/callback",),
        registers_with="cimd dcr preregistered",
    ),
    KnownClient(
        key="vscode",
        name="Visual Studio Code",
        metadata_url_prefixes=("https://vscode.dev/oauth/", "https://insiders.vscode.dev/oauth/"),
        redirect_uris=("https://vscode.dev/redirect", "https://insiders.vscode.dev/redirect"),
        loopback_paths=("/",),
        registers_with="cimd dcr preregistered",
    ),
    KnownClient(
        key="cursor",
        name="Cursor",
        redirect_uris=(
            "cursor://anysphere.cursor-mcp/oauth/callback",
            "https://www.cursor.com/agents/mcp/oauth/callback",
        ),
        loopback_paths=("/callback",),
        registers_with="dcr preregistered",
    ),
    KnownClient(
        key="zed",
        name="Zed",
        metadata_url_prefixes=("https://zed.dev/oauth/",),  # https://zed.dev/oauth/client-metadata.json
        loopback_paths=("/callback", "/mcp/oauth/callback"),
        registers_with="cimd dcr",
    ),
    KnownClient(
        key="goose",
        name="Goose",
        metadata_url_prefixes=("https://goose-docs.ai/oauth/",),  # since goose 1.32: .../client-metadata.json
        loopback_paths=("/oauth_callback", "/callback"),
        registers_with="cimd dcr",
    ),
    KnownClient(
        key="gemini-cli",
        name="Gemini CLI",
        redirect_uris=("http://localhost:7777/oauth/callback",),
        loopback_paths=("/oauth/callback",),
        registers_with="dcr preregistered",
    ),
    KnownClient(
        key="mcp-inspector",
        name="MCP Inspector",
        redirect_uris=("http://localhost:6274/oauth/callback", "http://localhost:6274/oauth/callback/debug"),
        registers_with="dcr cimd preregistered",
    ),
)


@dataclass(frozen=True)
class KnownMatch:
    entry: KnownClient
    basis: str  # "metadata document" (proven), "redirect URI" (vendor host or scheme), "loopback redirect URI"

    @property
    def label(self) -> str:
        return f"{self.entry.name} (by {self.basis})"


def known_client_match(*, client_id: str, redirect_uris: list[str] | str) -> KnownMatch | None:
    """The catalog entry a client is, with the basis of the match, or None."""
    uris = redirect_uris.split() if isinstance(redirect_uris, str) else list(redirect_uris)
    # The longest prefix wins (Claude Code's document sits under claude.ai/oauth/).
    by_document = [
        (len(prefix), entry)
        for entry in KNOWN_CLIENTS
        for prefix in entry.metadata_url_prefixes
        if client_id.startswith(prefix)
    ]
    if by_document:
        return KnownMatch(max(by_document, key=lambda pair: pair[0])[1], "metadata document")
    if client_id.startswith("https://"):
        # A metadata-document client is who its URL says: a document elsewhere (on a known vendor's host or
        # not) is not made a known client by the loopback or vendor redirect URIs it lists.
        return None
    if not uris:
        return None
    for entry in KNOWN_CLIENTS:  # its vendor redirect URIs, plus perhaps its loopback ones (VS Code)
        vendor = [uri in entry.redirect_uris for uri in uris]
        rest = [uri for uri, is_vendor in zip(uris, vendor, strict=True) if not is_vendor]
        if any(vendor) and all(_is_loopback(uri, entry.loopback_paths) for uri in rest):
            return KnownMatch(entry, "redirect URI")
    for entry in KNOWN_CLIENTS:
        if entry.loopback_paths and all(_is_loopback(uri, entry.loopback_paths) for uri in uris):
            return KnownMatch(entry, "loopback redirect URI")
    return None


def client_known(client: Client) -> KnownMatch | None:
    return known_client_match(client_id=client.client_id, redirect_uris=client.redirect_uris)


def client_admitted(*, server: McpServer, client_id: str, redirect_uris: list[str] | str, preregistered: bool) -> bool:
    """The server's admission policy: any client; known ones and pre-registered ones; pre-registered only."""
    policy = server.client_admission
    if policy == McpServer.ClientAdmission.ANY or preregistered:
        return True
    if policy == McpServer.ClientAdmission.KNOWN:
        return known_client_match(client_id=client_id, redirect_uris=redirect_uris) is not None
    return False


def client_row_admitted(*, server: McpServer, client: Client) -> bool:
    return client_admitted(
        server=server,
        client_id=client.client_id,
        redirect_uris=client.redirect_uris,
        preregistered=client.registration_source == Client.RegistrationSource.MANUAL,
    )


def _is_loopback(uri: str, paths: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in LOOPBACK_HOSTS
        and (parts.path or "/") in paths
        and not parts.query
        and not parts.fragment
    )
