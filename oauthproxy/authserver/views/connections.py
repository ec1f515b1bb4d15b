"""GET/POST /connections/: a signed-in user's own connections (DESIGN §2); see ``authserver.connections``.

Who the browser is, per server, lives in a signed, HttpOnly cookie (``CONNECTIONS_COOKIE``) set when a
sign-in through that server's upstream completed. CSRF-protected, never framed, never cached."""

from __future__ import annotations

import json
import time

from django.core import signing
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_deny
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from oauthproxy.authserver.connections import (
    ConnectionsSignedIn,
    connection_disconnect,
    connections_list,
    connections_signin_start,
)
from oauthproxy.authserver.views.authorize import error_page, page_headers
from oauthproxy.authserver.views.cookies import callback_cookie_set, cookie_set
from oauthproxy.core.exceptions import InvalidRequest, OAuthError
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import McpServer

CONNECTIONS_COOKIE = "oauthproxy_connections"
SIGNIN_COOKIE = "oauthproxy_connections_signin"
_SALT = "oauthproxy.connections"


def _signed_in_entries(request: HttpRequest) -> dict[str, list]:
    """{server id: [subject, expiry]} of the sign-ins in this browser's cookie that have not expired."""
    try:
        entries = json.loads(request.get_signed_cookie(CONNECTIONS_COOKIE, salt=_SALT, default=None) or "{}")
    except (signing.BadSignature, ValueError):
        return {}
    now = time.time()
    return {
        server_id: entry for server_id, entry in (entries if isinstance(entries, dict) else {}).items()
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        and isinstance(entry[1], (int, float)) and entry[1] > now
    }


def signed_in_subjects(request: HttpRequest) -> dict[str, str]:
    """{server id: subject} of the sign-ins this browser completed that have not expired."""
    return {server_id: entry[0] for server_id, entry in _signed_in_entries(request).items()}


def connections_cookie_add(response: HttpResponse, request: HttpRequest, *, signed_in: ConnectionsSignedIn) -> None:
    lifetime = proxy_settings.CONNECTIONS_SIGNIN_SECONDS
    entries = _signed_in_entries(request)
    entries[signed_in.server_id] = [signed_in.subject, time.time() + lifetime]
    cookie_set(response, request, name=CONNECTIONS_COOKIE, value=json.dumps(entries), salt=_SALT,
               max_age=lifetime, path="/connections/")


@never_cache
@xframe_options_deny
@csrf_protect
@require_http_methods(["GET", "POST"])
def connections(request: HttpRequest) -> HttpResponse:
    servers = list(McpServer.objects.enabled().order_by("name"))
    subjects = signed_in_subjects(request)
    try:
        if request.method == "POST":
            server = next((s for s in servers if s.slug == request.POST.get("server")), None)
            if server is None:
                raise InvalidRequest("Unknown MCP server.")
            action = request.POST.get("action")
            if action == "signin":
                start = connections_signin_start(server=server)
                response = HttpResponseRedirect(start.url)
                callback_cookie_set(response, request, name=SIGNIN_COOKIE, server=server, key=start.browser_key)
                return response
            if action == "disconnect":
                subject = subjects.get(str(server.pk))
                if subject is None:
                    raise InvalidRequest("Sign in through this server first.")
                connection_disconnect(server=server, subject=subject, client_pk=request.POST.get("client", ""))
                return HttpResponseRedirect(request.path)
            raise InvalidRequest("Choose sign in or disconnect.")
    except OAuthError as exc:
        return error_page(request, error=exc)
    rows = [
        {
            "server": server,
            "signed_in": str(server.pk) in subjects,
            "connections": connections_list(server=server, subject=subjects[str(server.pk)])
            if str(server.pk) in subjects else [],
        }
        for server in servers
    ]
    response = render(request, "oauthproxy/connections.html", {"rows": rows})
    response["Referrer-Policy"] = "same-origin"  # see views.consent: the form POST needs its Origin
    return page_headers(response)
