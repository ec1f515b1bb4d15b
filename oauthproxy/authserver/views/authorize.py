"""GET /oauth/<slug>/authorize (DESIGN §4), and the page/redirect/cookie helpers the consent and callback
views share. Views only translate HTTP; the flow lives in ``services.authorization``."""

from urllib.parse import urlsplit

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from oauthproxy.authserver.authorization import (
    ErrorRedirect,
    authorization_begin,
    authorization_request_validate,
    browser_key_is_valid,
    browser_key_new,
)
from oauthproxy.authserver.views.cookies import cookie_set
from oauthproxy.core.exceptions import OAuthError, RateLimited
from oauthproxy.core.ratelimit import client_ip
from oauthproxy.core.servers import server_get_enabled
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import McpServer

BROWSER_COOKIE = "oauthproxy_browser"
BROWSER_COOKIE_PATH = "/oauth/"

# No script, no images, no framing, no plugins: the pages are static HTML with one inline <style>.
# form-action is deliberately absent on the consent page: Chromium applies it to the whole redirect chain
# a form submission starts (our 302 to the upstream, the upstream's own federation hops, its redirect to
# our callback, our redirect to the client's URI, possibly a private-use scheme), which no list can name;
# the page carries no untrusted markup (everything is escaped, no script runs) that could plant a form.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
ERROR_PAGE_CSP = PAGE_CSP + "; form-action 'none'"

_TITLES = {
    "invalid_client": "Unknown application",
    "access_denied": "Request refused",
    "slow_down": "Too many requests",
    "not_found": "Not found",
}


def page_headers(response: HttpResponse, *, csp: str = PAGE_CSP) -> HttpResponse:
    response["Content-Security-Policy"] = csp
    response["X-Frame-Options"] = "DENY"
    return response


def error_page(
    request: HttpRequest, *, error: OAuthError, server: McpServer | None = None, status: int | None = None
) -> HttpResponse:
    """An OAuth error shown to the user: used whenever redirecting to the client cannot be trusted."""
    if status is None:
        status = error.status if error.status in (403, 429) else 400
    response = render(
        request,
        "oauthproxy/error.html",
        {
            "title": _TITLES.get(error.error, "This request cannot be completed"),
            "error": error.error,
            "description": error.description,
            "server": server,
        },
        status=status,
    )
    if isinstance(error, RateLimited):
        response["Retry-After"] = str(error.retry_after)
    return page_headers(response, csp=ERROR_PAGE_CSP)


def not_found_page(request: HttpRequest) -> HttpResponse:
    return error_page(
        request,
        error=OAuthError("There is no MCP server at this address, or it is switched off.", error="not_found"),
        status=404,
    )


class ClientRedirect(HttpResponseRedirect):
    """A redirect to a client's redirect URI, which the services have validated against the registration.
    Native apps use private-use schemes (RFC 8252 §7.1), so the scheme allow-list is the URI's own."""

    def __init__(self, url: str):
        self.allowed_schemes = [urlsplit(url).scheme]
        super().__init__(url)


def browser_key_from_request(request: HttpRequest) -> str | None:
    key = request.COOKIES.get(BROWSER_COOKIE)
    return key if browser_key_is_valid(key) else None


def browser_cookie_set(response: HttpResponse, request: HttpRequest, key: str) -> None:
    """The key binding flows (and remembered consent) to this browser. Lax so the upstream's top-level
    redirect to our callback carries it; HttpOnly; Secure whenever the public URL is https."""
    cookie_set(response, request, name=BROWSER_COOKIE, value=key, path=BROWSER_COOKIE_PATH,
               max_age=max(proxy_settings.CONSENT_REMEMBER_SECONDS, proxy_settings.UPSTREAM_STATE_LIFETIME * 2))


@never_cache
@require_GET
def authorize(request: HttpRequest, slug: str) -> HttpResponse:
    server = server_get_enabled(slug=slug)
    if server is None:
        return not_found_page(request)
    browser_key = browser_key_from_request(request)
    new_key = browser_key is None
    if new_key:
        browser_key = browser_key_new()
    try:
        auth_request = authorization_request_validate(
            server=server, params=dict(request.GET.lists()), source=client_ip(request)
        )
        response: HttpResponse = HttpResponseRedirect(
            authorization_begin(auth_request=auth_request, browser_key=browser_key, browser_is_new=new_key)
        )
    except ErrorRedirect as exc:
        return ClientRedirect(exc.url)
    except OAuthError as exc:
        return error_page(request, error=exc, server=server)
    if new_key:
        browser_cookie_set(response, request, browser_key)
    return response
