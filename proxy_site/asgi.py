"""The ASGI entry point (uvicorn ``proxy_site.asgi:application``).

Gateway requests (``/mcp/<slug>``) go straight to ``gateway_asgi``: the same view as the Django route,
without the middleware stack (see ``oauthproxy.gateway.asgi``). The OAuth endpoints programs call (token,
revoke, register, introspect) go to ``direct_endpoint_asgi``: their Django views, without the middleware
stack, on a fixed thread pool (see ``oauthproxy.authserver.asgi``). Everything else is plain Django. The
lifespan protocol closes the gateway's pooled connections and the endpoint threads on shutdown.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proxy_site.settings.production")

django_application = get_asgi_application()

# Imported once Django is set up (they use models and settings).
from oauthproxy.authserver.asgi import (  # noqa: E402
    direct_endpoint_asgi,
    direct_endpoint_match,
    direct_endpoint_threads_shutdown,
)
from oauthproxy.gateway.asgi import gateway_asgi, gateway_path_slug  # noqa: E402
from oauthproxy.gateway.forwarding import internal_server_pool_close  # noqa: E402


async def application(scope, receive, send):
    if scope["type"] == "http":
        slug = gateway_path_slug(scope)
        if slug is not None:
            return await gateway_asgi(scope, receive, send, slug=slug)
        match = direct_endpoint_match(scope)
        if match is not None:
            return await direct_endpoint_asgi(scope, receive, send, match=match)
    elif scope["type"] == "lifespan":
        return await lifespan(receive, send)
    return await django_application(scope, receive, send)


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await internal_server_pool_close()
            direct_endpoint_threads_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
