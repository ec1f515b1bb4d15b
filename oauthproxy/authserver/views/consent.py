"""GET/POST /oauth/<slug>/consent: the user approves or denies an MCP client (DESIGN §4, §5.6).

CSRF-protected, never framed, and bound to the browser that started the flow."""

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_deny
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from oauthproxy.authserver.authorization import (
    ErrorRedirect,
    authorization_approve,
    authorization_deny,
    consent_details,
    consent_request_get,
)
from oauthproxy.authserver.views.authorize import (
    ClientRedirect,
    browser_key_from_request,
    error_page,
    not_found_page,
    page_headers,
)
from oauthproxy.core.exceptions import InvalidRequest, OAuthError
from oauthproxy.core.servers import server_get_enabled


@never_cache
@xframe_options_deny
@csrf_protect
@require_http_methods(["GET", "POST"])
def consent(request: HttpRequest, slug: str) -> HttpResponse:
    server = server_get_enabled(slug=slug)
    if server is None:
        return not_found_page(request)
    source = request.POST if request.method == "POST" else request.GET
    try:
        pending = consent_request_get(
            server=server, request_id=source.get("request"), browser_key=browser_key_from_request(request)
        )
        if request.method == "GET":
            response = render(
                request,
                "oauthproxy/consent.html",
                {
                    "details": consent_details(pending=pending),
                    "request_id": str(pending.pk),
                    "tool_rules": server.tool_policy or [],
                },
            )
            # Not the global no-referrer: under it browsers send "Origin: null" with the form POST, which
            # Django's CSRF origin check rightly refuses. same-origin still sends nothing to other sites.
            response["Referrer-Policy"] = "same-origin"
            return page_headers(response)
        decision = request.POST.get("decision")
        if decision == "approve":
            try:
                url = authorization_approve(pending=pending, remember=request.POST.get("remember") == "yes")
            except ErrorRedirect as exc:  # e.g. the client is over its upstream quota
                return ClientRedirect(exc.url)
            return HttpResponseRedirect(url)
        if decision == "deny":
            return ClientRedirect(authorization_deny(pending=pending))
        raise InvalidRequest("Choose Allow or Deny.")
    except OAuthError as exc:
        return error_page(request, error=exc, server=server)
