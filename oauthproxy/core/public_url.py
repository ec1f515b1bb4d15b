"""Is the proxy reached at its public URL? Everything a client is told (issuer, resource, callback URL)
derives from ``PUBLIC_BASE_URL``; an admin who browses from another host (``make run`` on another port, a
``localhost`` alias, a forgotten setting) would configure and test a proxy clients cannot reach as told."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings

_DEFAULT_PORTS = (80, 443)


def request_origin(request) -> str:
    """The origin the request was sent to (scheme and ``Host``), as the browser or API client saw it."""
    return f"{request.scheme}://{request.get_host()}"


def public_url_mismatch(*, origin: str) -> str | None:
    """What is wrong when *origin* is not the host of ``PUBLIC_BASE_URL`` (None when it is)."""
    public = settings.PUBLIC_BASE_URL
    if _host_port(origin) == _host_port(public):
        return None
    return (
        f"This page was opened at {origin}, but PUBLIC_BASE_URL is {public}: clients are sent there (issuer, "
        f"resource and callback URLs), and a Try it login ends there. Set PUBLIC_BASE_URL to the address "
        f"clients use (`PORT=9000 make run` sets it to http://127.0.0.1:9000), or browse at {public}."
    )


def _host_port(url: str) -> tuple[str, int | None]:
    """Host and explicit port of *url*. The scheme and its default ports are not compared: TLS often ends at
    a proxy in front, which then sends plain http to the app."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").lower(), None if port in _DEFAULT_PORTS else port
