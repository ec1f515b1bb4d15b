"""GET /oauth/<slug>/callback: the upstream sends the user back here (DESIGN §4, §5.7)."""

from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ..exceptions import OAuthError
from ..selectors import server_get_enabled
from ..services.authorization import authorization_complete
from .authorize import ClientRedirect, browser_key_from_request, error_page, not_found_page


@never_cache
@require_GET
def callback(request: HttpRequest, slug: str) -> HttpResponse:
    server = server_get_enabled(slug=slug)
    if server is None:
        return not_found_page(request)
    try:
        url = authorization_complete(
            server=server, params=dict(request.GET.lists()), browser_key=browser_key_from_request(request)
        )
    except OAuthError as exc:
        return error_page(request, error=exc, server=server)
    return ClientRedirect(url)
