"""Reading a request body over ASGI, for the entry points that bypass Django's ASGI handler
(``views.gateway.gateway_asgi``, ``views.direct.direct_endpoint_asgi``)."""


class BodyTooLarge(Exception):
    """The body grew past the caller's limit (answer 413 without reading the rest)."""


async def body_read(receive, *, limit: int) -> bytes | None:
    """The whole request body, or None when the client disconnected before sending it. Raises
    ``BodyTooLarge`` as soon as more than *limit* bytes arrived."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge()
        if not message.get("more_body", False):
            return bytes(body)
