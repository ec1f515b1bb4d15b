"""Routes for the gateway (see oauthproxy/urls.py for the layout): ``/mcp/<slug>``, trailing slash tolerated.

``proxy_site.asgi`` serves the same paths through ``gateway_asgi`` (no middleware); this route is the
ordinary Django way in, used by Django's test client and any other ASGI entry point.
"""

from django.urls import re_path

from ..views.gateway import gateway

urlpatterns = [
    re_path(r"^mcp/(?P<slug>[a-z0-9-]{1,64})/?$", gateway, name="gateway"),
]
