"""The proxy's browser cookies, set one way: HttpOnly; SameSite=Lax (the upstream's top-level redirect back to
our callback must carry them); Secure whenever the request or the public URL is https; each sent only to the
path that reads it."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import McpServer


def cookie_set(response: HttpResponse, request: HttpRequest, *, name: str, value: str, max_age: int, path: str,
               salt: str | None = None) -> None:
    """Set cookie *name* (signed with *salt* when given)."""
    secure = request.is_secure() or settings.PUBLIC_BASE_URL.startswith("https://")
    options = dict(max_age=max_age, path=path, secure=secure, httponly=True, samesite="Lax")
    if salt is None:
        response.set_cookie(name, value, **options)
    else:
        response.set_signed_cookie(name, value, salt=salt, **options)


def callback_cookie_set(response: HttpResponse, request: HttpRequest, *, name: str, server: McpServer,
                        key: str) -> None:
    """The browser binding of an upstream sign-in in progress: sent only to *server*'s callback, gone when
    the upstream state expires."""
    cookie_set(response, request, name=name, value=key, max_age=proxy_settings.UPSTREAM_STATE_LIFETIME,
               path=f"/oauth/{server.slug}/callback")
