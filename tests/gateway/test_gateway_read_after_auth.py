"""The gateway authenticates before it reads (issue 13, finding 5): slug and token come from the headers,
a declared Content-Length above the limit is refused at once, and a refused request's body is never read
(``receive`` is not awaited), so a stranger's large bodies cost no memory."""

from __future__ import annotations

import json

import anyio
import pytest

from oauthproxy.gateway.asgi import gateway_asgi
from oauthproxy.gateway.forwarding import internal_server_pool_close, max_request_bytes
from tests.conftest import make_server
from tests.gateway.conftest import INITIALIZE, make_grant

pytestmark = pytest.mark.django_db(transaction=True)


class Receive:
    """An ASGI receive() that counts how often the gateway asked for the body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": self.body, "more_body": False}
        await anyio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}


def scope(slug: str, headers: dict[str, str]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/mcp/{slug}",
        "raw_path": f"/mcp/{slug}".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5555),
    }


def call(slug: str, headers: dict[str, str], body: bytes) -> tuple[int, Receive]:
    receive = Receive(body)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        try:
            with anyio.fail_after(10):
                await gateway_asgi(scope(slug, headers), receive, send, slug=slug)
        finally:
            await internal_server_pool_close()

    anyio.run(run)
    return sent[0]["status"], receive


BODY = json.dumps(INITIALIZE).encode()


@pytest.mark.parametrize(
    ("slug", "authorization", "status"),
    [("nope", "Bearer whatever-token-value", 404), ("crm", None, 401), ("crm", "Bearer not-a-real-token", 401)],
    ids=["unknown-slug", "no-token", "bad-token"],
)
def test_a_refused_request_never_has_its_body_read(slug, authorization, status):
    make_server(slug="crm", mcp_url="http://127.0.0.1:9/mcp")
    headers = {"Content-Type": "application/json", "Content-Length": str(15 * 1024 * 1024)}
    if authorization:
        headers["Authorization"] = authorization
    answer, receive = call(slug, headers, b"x" * 1024)
    assert answer == status
    assert receive.calls == 0  # not one body message was pulled in


def test_a_declared_length_above_the_limit_is_refused_before_reading():
    grant = make_grant(make_server(slug="crm", mcp_url="http://127.0.0.1:9/mcp"))
    headers = {**grant.auth, "Content-Type": "application/json", "Content-Length": str(max_request_bytes() + 1)}
    answer, receive = call("crm", headers, b"x")
    assert answer == 413
    assert receive.calls == 0


def test_a_non_numeric_content_length_is_a_400_not_a_read():
    grant = make_grant(make_server(slug="crm", mcp_url="http://127.0.0.1:9/mcp"))
    headers = {**grant.auth, "Content-Type": "application/json", "Content-Length": "12abc"}
    answer, receive = call("crm", headers, b"x")
    assert answer == 400
    assert receive.calls == 0


def test_an_authenticated_request_is_read_and_forwarded(internal):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url))
    headers = {**grant.auth, "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Content-Length": str(len(BODY))}
    answer, receive = call("crm", headers, BODY)
    assert answer == 200
    assert receive.calls >= 1
