"""Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document), per MCP server.

A client whose ``client_id`` is an https URL with a path is resolved by fetching that URL. The document
must name itself (its ``client_id`` equals the URL byte for byte), hold no secret, name a method the proxy
supports (``token_endpoint_auth_method``, else the first of ``token_endpoint_auth_methods_supported``
that is: ``none``, or ``private_key_jwt`` with a ``jwks_uri`` or ``jwks``, see ``client_auth``) and pass
the same metadata and redirect URI rules as Dynamic Client Registration. It then becomes a ``Client`` row of that server
(``registration_source = cimd``), refreshed when the HTTP cache lifetime (``Cache-Control: max-age``,
clamped by DOT's ``CIMD_METADATA_MIN/MAX_AGE_SECONDS``) has passed. A failed refresh keeps the last good
document; a failure is remembered for ``CIMD_FAILURE_BACKOFF_SECONDS`` so a bad URL is not refetched on
every request, and at most ``CIMD_MAX_CONCURRENT_FETCHES`` fetches run at once per process.

The fetch (DESIGN §5.10) is django-oauth-toolkit's swappable fetcher (``CIMD_METADATA_FETCHER``),
subclassed as ``ProxyMetadataFetcher`` onto the proxy's one outbound path (``core.http.outbound_fetch``):
bounded in time (``CIMD_FETCH_TIMEOUT_SECONDS`` for the whole exchange, enforced on the socket, so a server
sending one byte a second is cut at the deadline) and size (``CIMD_MAX_DOCUMENT_SIZE``), following no
redirects, ignoring proxy environment variables, and connecting only to public addresses: the host is
resolved when the connection is opened, *every* address is checked (private, loopback, link-local/cloud
metadata, IPv4 embedded in IPv6...), and the socket is connected to the address that was checked, while TLS
still verifies the real host name. As the check and the connect use one resolution, DNS rebinding between
them is not possible. Only with ``proxy_settings.CIMD_ALLOW_PRIVATE_ADDRESSES`` (tests, local development)
are http URLs and private addresses allowed.

Client rows are read through a per-process cache (``caching.clients``: by server and ``client_id``, for
``proxy_settings.CLIENT_CACHE_SECONDS``, 5 s by default), as every authorize and token request looks its
client up. What that means:

- A save or delete of a client in this process drops its entry at once (and again on commit), so a client
  disabled, changed or deleted here is refused or seen changed by the next request of this process.
  *Other* processes keep their copy until it expires: a client disabled or deleted elsewhere can still
  start an authorization or redeem a code there for up to the TTL (as with the server cache and the
  gateway's token cache). Callers still check ``is_usable()`` on every request; only the row may be that
  old.
- The cache never extends a metadata document's life: ``cimd_expires_at`` is checked on every lookup,
  cached or not, and once it has passed the row is read again from the database (not the cache) before
  the document is fetched and the row rewritten, so a refresh never writes back a stale copy (e.g.
  re-enabling a client that another process disabled).
- Callers get their own copy, whose ``server`` is the caller's server, so nothing a request sets on it
  leaks into another request.
"""

import contextlib
import hashlib
import json
import logging
import re
import threading
from dataclasses import replace
from datetime import timedelta
from urllib.parse import urlsplit

from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone
from oauth2_provider.cimd import CIMDError, SafeMetadataFetcher
from oauth2_provider.settings import oauth2_settings

from oauthproxy.authserver.client_auth import PRIVATE_KEY_JWT, client_auth_methods_choose
from oauthproxy.authserver.known_clients import client_admitted
from oauthproxy.authserver.redirect_uris import is_utf8
from oauthproxy.authserver.registration import (
    ClientMetadata,
    client_metadata_apply,
    client_metadata_validate,
    client_registration_capacity_check,
)
from oauthproxy.core.audit import audit_record
from oauthproxy.core.caching import client_cache_key, clients
from oauthproxy.core.exceptions import InvalidClient, InvalidClientMetadata, InvalidRedirectUri, InvalidRequest
from oauthproxy.core.http import (
    PUBLIC_ONLY,
    UNRESTRICTED,
    DestinationRefused,
    OutboundError,
    OutboundTimeout,
    ResponseTooLarge,
    outbound_fetch,
)
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.clients import client_row
from oauthproxy.models import AuditEvent, Client, McpServer

logger = logging.getLogger(__name__)

MAX_CLIENT_ID_LENGTH = 255
USER_AGENT = "mcp-oauth-proxy (client metadata fetcher)"
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


class ClientMetadataDocumentError(InvalidClient):
    """The client's metadata document could not be fetched or is not acceptable (``invalid_client``, 401).

    The description says why, for the client's developer; it never contains secrets."""


def client_id_is_metadata_url(client_id: str) -> bool:
    """True when *client_id* names a metadata document: an https URL with a path (http too when private
    addresses are allowed, i.e. in tests)."""
    if not isinstance(client_id, str):
        return False
    lowered = client_id[:8].lower()
    if not (lowered.startswith("https://") or (_allow_private() and lowered.startswith("http://"))):
        return False
    try:
        return bool(urlsplit(client_id).path)
    except ValueError:
        return False


def client_resolve(*, server: McpServer, client_id: str) -> Client | None:
    """The client of *server* called *client_id*, or None when there is none.

    Metadata-document URLs are fetched on first sight and when their cache lifetime has passed; a bad or
    unreachable document raises ClientMetadataDocumentError (``invalid_client``), or RegistrationLimitReached
    when the server holds its maximum of clients. Disabled clients are returned too: check ``is_usable()``.
    """
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID_LENGTH:
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in client_id) or not is_utf8(client_id):
        return None
    client = _with_server(
        clients.get(
            client_cache_key(server_id=server.pk, client_id=client_id),
            lambda: _client_row(server=server, client_id=client_id),
        ),
        server,
    )
    if _document_is_current(client, client_id):
        return client
    # The document is due (or was never seen): decide on the stored row, never on a cached copy.
    client = _with_server(_client_row(server=server, client_id=client_id), server)
    if _document_is_current(client, client_id):
        return client
    if client is None and server.client_admission == McpServer.ClientAdmission.PREREGISTERED:
        raise ClientMetadataDocumentError("This server admits pre-registered clients only.")
    try:
        metadata, max_age = _document_load(server=server, url=client_id)
    except ClientMetadataDocumentError as exc:
        if client is None:
            raise
        logger.warning("keeping the last good metadata document of %s at %s: %s", client_id, server.slug,
                       exc.description)
        return client
    return _client_upsert(server=server, url=client_id, metadata=metadata, max_age=max_age, client=client)


def _client_row(*, server: McpServer, client_id: str) -> Client | None:
    return client_row(server_pk=server.pk, client_id=client_id)


def _with_server(client: Client | None, server: McpServer) -> Client | None:
    """The caller's server on the client, never a cached one (and ``is_usable()`` needs no query)."""
    if client is not None:
        client.server = server
    return client


def _document_is_current(client: Client | None, client_id: str) -> bool:
    """Nothing to fetch: not a metadata-document client, or one whose document has not expired yet."""
    if not client_id_is_metadata_url(client_id):
        return True
    if client is not None and client.registration_source != Client.RegistrationSource.CIMD:
        return True  # provisioned by an operator under this id; never taken over by a document
    return client is not None and client.cimd_expires_at is not None and client.cimd_expires_at > timezone.now()


def _document_load(*, server: McpServer, url: str) -> tuple[ClientMetadata, int]:
    """Fetch and validate the document at *url*; remember failures for the backoff period."""
    backoff_key = "oauthproxy:cimd:backoff:" + hashlib.sha256(url.encode()).hexdigest()
    if reason := cache.get(backoff_key):
        raise ClientMetadataDocumentError(reason)
    with _fetch_slot() as acquired:
        if not acquired:
            raise ClientMetadataDocumentError("Too many client metadata documents are being fetched; retry shortly.")
        try:
            try:
                document, max_age = oauth2_settings.CIMD_METADATA_FETCHER().fetch(url)
            except CIMDError as exc:
                raise ClientMetadataDocumentError(str(exc))
            return _document_validate(server=server, url=url, document=document), max_age
        except (InvalidClientMetadata, InvalidRedirectUri) as exc:
            error = ClientMetadataDocumentError(f"The client metadata document is invalid: {exc.description}")
        except ClientMetadataDocumentError as exc:
            error = exc
    logger.info("client metadata document %s refused: %s", url, error.description)
    cache.set(backoff_key, error.description, oauth2_settings.CIMD_FAILURE_BACKOFF_SECONDS)
    raise error


def _document_validate(*, server: McpServer, url: str, document: dict) -> ClientMetadata:
    if document.get("client_id") != url:
        raise ClientMetadataDocumentError(
            "The client metadata document's client_id must equal the URL it is served from."
        )
    try:
        method, methods = client_auth_methods_choose(document)
    except InvalidRequest as exc:
        raise ClientMetadataDocumentError(exc.description)
    if "client_secret" in document or "client_secret_expires_at" in document:
        raise ClientMetadataDocumentError("A client metadata document must not contain a client_secret.")
    keys = {}
    if method == PRIVATE_KEY_JWT:
        keys = _document_keys(document)
    # The secret-less methods are validated as a public client; the chosen one is stored on the row.
    metadata = client_metadata_validate(
        server=server, data={**document, "token_endpoint_auth_method": "none"}, default_auth_method="none"
    )
    extra = {**metadata.extra, **keys, "token_endpoint_auth_method": method,
             "token_endpoint_auth_methods_supported": methods}
    return replace(metadata, token_endpoint_auth_method=method, extra=extra)


def _document_keys(document: dict) -> dict:
    """The ``jwks_uri`` (an https URL under the same fetch rules as the document) or inline ``jwks`` of a
    private_key_jwt client."""
    if isinstance(document.get("jwks"), dict):
        if not isinstance(document["jwks"].get("keys"), list):
            raise ClientMetadataDocumentError("The client metadata document's jwks must be a JWK Set.")
        return {"jwks": document["jwks"]}
    url = document.get("jwks_uri")
    try:
        if not isinstance(url, str) or len(url) > MAX_CLIENT_ID_LENGTH * 8:
            raise CIMDError("not a URL")
        _url_check(url)
    except CIMDError as exc:
        raise ClientMetadataDocumentError(f"The client metadata document's jwks_uri is not acceptable: {exc}.")
    return {"jwks_uri": url}


def _client_upsert(
    *, server: McpServer, url: str, metadata: ClientMetadata, max_age: int, client: Client | None
) -> Client:
    created = client is None
    if not client_admitted(server=server, client_id=url, redirect_uris=metadata.redirect_uris, preregistered=False):
        raise ClientMetadataDocumentError(
            "This server admits only the known MCP clients of its catalog and pre-registered clients."
        )
    if created:
        client_registration_capacity_check(server=server)
        client = Client(server=server, client_id=url, registration_source=Client.RegistrationSource.CIMD)
    before = (client.redirect_uris, client.name, client.metadata)
    try:
        client_metadata_apply(client=client, metadata=metadata)
    except (InvalidClientMetadata, InvalidRedirectUri) as exc:
        raise ClientMetadataDocumentError(f"The client metadata document is invalid: {exc.description}")
    client.user = None
    client.cimd_expires_at = timezone.now() + timedelta(seconds=max_age)
    try:
        with transaction.atomic():
            client.save()
    except IntegrityError:
        # Another request saw this URL at this server first; use its row.
        winner = _with_server(_client_row(server=server, client_id=url), server)
        if winner is None or winner.registration_source != Client.RegistrationSource.CIMD:
            raise ClientMetadataDocumentError("The client could not be recorded; retry.")
        return winner
    changed = (client.redirect_uris, client.name, client.metadata) != before
    if created or changed:
        audit_record(
            kind=AuditEvent.Kind.CLIENT_REGISTERED if created else AuditEvent.Kind.CLIENT_UPDATED,
            server=server,
            client=client,
            message=f"{'registered' if created else 'updated'} {client.name or url} from its metadata document",
            detail={"source": "cimd", "client_id": url, "redirect_uris": metadata.redirect_uris},
        )
    return client


class ProxyMetadataFetcher(SafeMetadataFetcher):
    """django-oauth-toolkit's swappable CIMD fetcher (``CIMD_METADATA_FETCHER``), through the proxy's one
    outbound HTTP path (``core.http.outbound_fetch``): public addresses only, checked against the address
    connected to; a total deadline of ``CIMD_FETCH_TIMEOUT_SECONDS`` enforced on the socket (a server
    sending one byte a second is cut at the deadline); at most ``CIMD_MAX_DOCUMENT_SIZE`` bytes; no
    redirects. Its errors (``CIMDError``) say why in words for the client's developer."""

    def fetch(self, client_id: str) -> tuple[dict, int]:
        _url_check(client_id)
        max_size = oauth2_settings.CIMD_MAX_DOCUMENT_SIZE
        try:
            response = outbound_fetch(
                "GET", client_id,
                policy=UNRESTRICTED if _allow_private() else PUBLIC_ONLY,
                timeout=oauth2_settings.CIMD_FETCH_TIMEOUT_SECONDS,
                max_bytes=max_size,
                headers={"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT},
                decode_content=False,
            )
        except DestinationRefused as exc:
            raise CIMDError(f"The client metadata document cannot be fetched: {exc.reason}.")
        except OutboundTimeout:
            raise CIMDError("Fetching the client metadata document timed out.")
        except ResponseTooLarge:
            raise CIMDError(f"The client metadata document is larger than {max_size} bytes.")
        except OutboundError as exc:
            raise CIMDError(f"The client metadata document could not be fetched ({exc.reason}).")
        if 300 <= response.status < 400:
            raise CIMDError(
                f"Fetching the client metadata document returned a redirect (HTTP {response.status}); "
                "redirects are not followed."
            )
        if response.status != 200:
            raise CIMDError(f"Fetching the client metadata document returned HTTP {response.status}.")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")
        ):
            raise CIMDError("The client metadata document is not served as application/json.")
        try:
            document = json.loads(response.body.decode("utf-8"))
        except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
            raise CIMDError("The client metadata document is not valid JSON.")
        if not isinstance(document, dict):
            raise CIMDError("The client metadata document must be a JSON object.")
        return document, _max_age(response.headers.get("Cache-Control"))


def _max_age(cache_control: str | None) -> int:
    """The document's cache lifetime: ``max-age`` (``no-store``/``no-cache``: the minimum; none: the
    maximum), clamped to DOT's ``CIMD_METADATA_MIN/MAX_AGE_SECONDS``."""
    floor = oauth2_settings.CIMD_METADATA_MIN_AGE_SECONDS
    ceiling = oauth2_settings.CIMD_METADATA_MAX_AGE_SECONDS
    age = ceiling
    if cache_control:
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            age = floor
        elif match := _MAX_AGE.search(cache_control):
            age = int(match.group(1))
    return max(floor, min(age, ceiling))


_fetches_lock = threading.Lock()
_fetches: tuple[int, threading.BoundedSemaphore] | None = None


@contextlib.contextmanager
def _fetch_slot():
    """One of ``CIMD_MAX_CONCURRENT_FETCHES`` fetch slots of this process, without waiting: yields False
    when all are taken (0 or None: no cap)."""
    global _fetches
    size = oauth2_settings.CIMD_MAX_CONCURRENT_FETCHES
    if not size:
        yield True
        return
    with _fetches_lock:
        if _fetches is None or _fetches[0] != size:
            _fetches = (size, threading.BoundedSemaphore(size))
        slots = _fetches[1]
    acquired = slots.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            slots.release()


def _url_check(url: str) -> None:
    """The client_id URL rules of the draft (§3): https, a host, a valid port, a path; no userinfo, no
    fragment, no dot segments. http is accepted only together with private addresses (tests)."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        raise CIMDError("The client_id URL is not acceptable: it has an invalid port.")
    scheme_ok = parts.scheme == "https" or (parts.scheme == "http" and _allow_private())
    problem = (
        "it must use the https scheme" if not scheme_ok
        else "it must contain a host" if not parts.hostname
        else "it has an invalid port" if not port_ok
        else "it must not contain a userinfo component" if parts.username or parts.password
        else "it must not contain a fragment component" if parts.fragment
        else "it must contain a path component" if not parts.path
        else "it must not contain dot path segments" if any(seg in (".", "..") for seg in parts.path.split("/"))
        else ""
    )
    if problem:
        raise CIMDError(f"The client_id URL is not acceptable: {problem}.")


def _allow_private() -> bool:
    return bool(proxy_settings.CIMD_ALLOW_PRIVATE_ADDRESSES)
