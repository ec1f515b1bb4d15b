"""Redirect URI rules (DESIGN §4, §5.4): what a client may register, and when a requested URI matches.

What may be registered:

- ``https://`` URIs;
- ``http://`` only on a loopback host (``localhost``, ``127.0.0.1``, ``[::1]``; RFC 8252 §7.3, §8.3);
- private-use schemes (RFC 8252 §7.1) in reverse-domain form, e.g. ``com.example.app:/callback``: the
  scheme must contain a dot. Single-word schemes some clients use (``cursor://...``) are accepted
  only when the operator lists them in ``proxy_settings.REDIRECT_URI_EXTRA_SCHEMES``;
- never ``javascript:``, ``data:``, ``file:``, ``vbscript:`` (or other browser-internal schemes), never a
  fragment, never userinfo (``https://user@host/``), never whitespace or control characters.

Matching is exact string comparison (RFC 9700 §2.1), with one exception: a registered ``http`` loopback
URI matches a request on any port (RFC 8252 §7.3), scheme, host, path and query still matching. That
comparison is django-oauth-toolkit's own (``check_redirect_to_uri_allowed``, with
``ALLOW_LOCALHOST_LOOPBACK`` on so ``localhost`` counts as loopback).
"""

from collections.abc import Iterable
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from oauth2_provider.models import check_redirect_to_uri_allowed
from oauth2_provider.validators import AllowedURIValidator

from oauthproxy.core.exceptions import InvalidRedirectUri
from oauthproxy.core.settings import proxy_settings

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Browser-internal or script-executing schemes: refused even if an operator lists them as extra schemes.
FORBIDDEN_SCHEMES = frozenset(
    {"javascript", "data", "file", "vbscript", "about", "blob", "filesystem", "view-source", "chrome", "ws", "wss"}
)
MAX_REDIRECT_URI_LENGTH = 2000
MAX_REDIRECT_URIS = 20


def redirect_uri_validate(uri: str) -> None:
    """Raise InvalidRedirectUri (RFC 7591 ``invalid_redirect_uri``) unless *uri* may be registered."""
    if not isinstance(uri, str) or not uri:
        raise InvalidRedirectUri("Each redirect URI must be a non-empty string.")
    shown = _shown(uri)
    if len(uri) > MAX_REDIRECT_URI_LENGTH:
        raise InvalidRedirectUri(f"Redirect URI {shown} is longer than {MAX_REDIRECT_URI_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri) or not is_utf8(uri):
        raise InvalidRedirectUri(f"Redirect URI {shown} contains whitespace or control characters.")
    if "#" in uri:
        raise InvalidRedirectUri(f"Redirect URI {shown} has a fragment (#...); fragments are not allowed.")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        raise InvalidRedirectUri(f"Redirect URI {shown} is not a valid URI.")
    scheme = parts.scheme
    if not scheme or ":" not in uri:
        raise InvalidRedirectUri(f"Redirect URI {shown} is not an absolute URI (it has no scheme).")
    if scheme in FORBIDDEN_SCHEMES:
        raise InvalidRedirectUri(f"Redirect URI {shown} uses the {scheme}: scheme, which is not allowed.")
    if "@" in parts.netloc:
        raise InvalidRedirectUri(f"Redirect URI {shown} contains userinfo (user@host); this is not allowed.")
    if scheme == "https":
        if not parts.hostname:
            raise InvalidRedirectUri(f"Redirect URI {shown} has no host.")
    elif scheme == "http":
        if parts.hostname not in LOOPBACK_HOSTS:
            raise InvalidRedirectUri(
                f"Redirect URI {shown} uses http:// on a non-loopback host; use https://, or http:// only with "
                "localhost, 127.0.0.1 or [::1]."
            )
    elif not redirect_uri_scheme_is_private_use(scheme):
        raise InvalidRedirectUri(
            f"Redirect URI {shown} uses the {scheme}: scheme; use https://, loopback http://, or a "
            "reverse-domain private-use scheme such as com.example.app:/callback."
        )
    if port == 0:
        raise InvalidRedirectUri(f"Redirect URI {shown} has an invalid port.")
    # Syntax (host, port, authority-less private-use form) is django-oauth-toolkit's validator's job.
    validator = AllowedURIValidator([scheme], name="redirect URI", allow_path=True, allow_query=True)
    try:
        validator(uri)
    except ValidationError:
        raise InvalidRedirectUri(f"Redirect URI {shown} is not a valid URI.")


def redirect_uris_validate(uris: object) -> list[str]:
    """Validate a registration's ``redirect_uris`` value; return it de-duplicated, order kept."""
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectUri("redirect_uris must be a non-empty array of URIs.")
    if len(uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(f"At most {MAX_REDIRECT_URIS} redirect URIs may be registered.")
    for uri in uris:
        redirect_uri_validate(uri)
    return list(dict.fromkeys(uris))


def redirect_uri_matches(registered: Iterable[str], requested: str) -> bool:
    """True when *requested* may be redirected to for a client that registered *registered*.

    Exact string match, except that a registered ``http`` loopback URI allows any port (RFC 8252 §7.3).
    """
    if not isinstance(requested, str) or not requested or "#" in requested:
        return False
    registered = [uri for uri in registered if isinstance(uri, str) and uri]
    if requested in registered:
        return True
    if not redirect_uri_is_loopback(requested):
        return False
    loopback = [uri for uri in registered if redirect_uri_is_loopback(uri)]
    if not loopback:
        return False
    allowed, _reasons = check_redirect_to_uri_allowed(requested, loopback)
    return allowed


def redirect_uri_is_loopback(uri: str) -> bool:
    """An ``http`` URI on a loopback host with a valid (or no) port and no userinfo."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in LOOPBACK_HOSTS
        and "@" not in parts.netloc
        and port != 0
    )


def redirect_uri_scheme_is_private_use(scheme: str) -> bool:
    """A scheme other than http(s) a native app may register: reverse-domain (has a dot), or operator-listed."""
    scheme = scheme.lower()
    if scheme in FORBIDDEN_SCHEMES or scheme in ("http", "https"):
        return False
    extra = {s.lower() for s in proxy_settings.REDIRECT_URI_EXTRA_SCHEMES}
    return "." in scheme or scheme in extra


def _shown(uri: str) -> str:
    return repr(uri if len(uri) <= 100 else uri[:100] + "...")


def is_utf8(text: str) -> bool:
    """False for text that cannot be sent as UTF-8 (lone surrogates from a percent-decoded query)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
