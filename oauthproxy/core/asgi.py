"""Reading a request body and sending a response over ASGI, for the entry points that bypass Django's ASGI
handler (``gateway.asgi.gateway_asgi``, ``authserver.asgi.direct_endpoint_asgi``)."""

from collections.abc import Iterable

from django.http import HttpResponseBase


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


def headers_encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """ASGI's header list (names and values as latin-1 bytes)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def response_send(send, *, status: int, headers: Iterable[tuple[str, str]], content: bytes) -> None:
    """Send one complete response in two messages, with a ``Content-Length`` unless ``headers`` has one."""
    raw = headers_encode(headers)
    if not any(name.lower() == b"content-length" for name, _value in raw):
        raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content, "more_body": False})


async def django_response_send(response: HttpResponseBase, send) -> None:
    """Send a (non-streaming) Django response: its headers, its cookies, its content."""
    headers = list(response.items())
    headers += [("set-cookie", cookie.output(header="").strip()) for cookie in response.cookies.values()]
    await response_send(send, status=response.status_code, headers=headers, content=response.content)
