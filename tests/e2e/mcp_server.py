"""Internal MCP server for end-to-end tests: the official MCP Python SDK over streamable HTTP.

Run:
    python tests/e2e/mcp_server.py --port 0 --userinfo-url http://127.0.0.1:PORT/me

Once it accepts connections it prints ONE JSON line on stdout:
    {"ready": true, "url": "http://127.0.0.1:PORT/mcp", "port": PORT}

Tools:
    whoami            calls the upstream userinfo endpoint with the bearer token of the incoming HTTP
                      request and returns its `sub` (proves the gateway forwarded a valid upstream token);
                      with --identity-jwks-url, verifies X-Identity-Assertion instead and returns its `sub`
    identity          the verified claims of X-Identity-Assertion (needs --identity-jwks-url)
    echo(text)        returns text
    echo_auth         returns the Authorization header the server received ("" when none)
    echo_headers      returns all request headers the server received (lower-cased names)
    stream_progress(count=5, delay=0.2)
                      sends `count` progress notifications `delay` seconds apart, then returns "done"
    slow(seconds=1)   sleeps, then returns "slept <seconds>"
    admin_reset       returns "reset"; each call is recorded (TOOL_CALLS, and in /__stats as "tool_calls"),
                      so tests can prove a call the gateway refused never arrived

Environment:
    USERINFO_URL      default for --userinfo-url
    IDENTITY_JWKS_URL, IDENTITY_ISSUER
                      defaults for --identity-jwks-url, --identity-issuer (the proxy's server issuer);
                      the audience is this server's own URL (the proxy's mcp_url)
    REQUIRE_BEARER    "1": requests to /mcp without `Authorization: Bearer ...` get 401;
                      "userinfo": in addition the token must be accepted by USERINFO_URL (every request
                      is checked, so an expired or revoked upstream token is refused like a real
                      resource server would)

Test-only endpoint: GET /__stats -> {"requests": {"POST": n, ...}, "unauthorized": n, "last_headers": {...}}
(counts HTTP requests that reached /mcp, before the bearer check).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import jwt
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

MCP_PATH = "/mcp"
TOOL_CALLS: list[str] = []  # names of the recorded tools called on this process's servers


# -- what an internal server needs to trust X-Identity-Assertion (the README shows the same lines) --------

_jwk_clients: dict[str, jwt.PyJWKClient] = {}


def verify_identity_assertion(assertion: str, *, jwks_url: str, audience: str, issuer: str) -> dict:
    """The claims of a proxy identity assertion, or ``jwt.InvalidTokenError``: signed by a key of the
    server's JWKS (fetched once, refetched on an unknown kid), for this audience and issuer, unexpired."""
    client = _jwk_clients.setdefault(jwks_url, jwt.PyJWKClient(jwks_url))
    key = client.get_signing_key_from_jwt(assertion)
    return jwt.decode(
        assertion, key.key, algorithms=["ES256", "EdDSA"], audience=audience, issuer=issuer,
        options={"require": ["iss", "aud", "sub", "exp", "iat", "jti"]},
    )


@dataclass(frozen=True)
class IdentityCheck:
    jwks_url: str
    issuer: str
    audience: str


def _incoming_headers(ctx: Context) -> dict[str, str]:
    """Headers of the HTTP request that carried this MCP message.

    With streamable HTTP the SDK puts the Starlette request in `ctx.request_context.request`
    (mcp 2.x: ServerRunner._make_context copies ServerMessageMetadata.request_context there, on both
    the session-based and the 2026-07-28 single-exchange paths).
    """
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return {}
    return {k.lower(): v for k, v in headers.items()}


def build_mcp(userinfo_url: str | None, identity: IdentityCheck | None = None) -> MCPServer:
    mcp = MCPServer("e2e-internal-mcp", version="1.0.0", instructions="Test server for the MCP OAuth proxy.")

    async def verified_identity(ctx: Context) -> dict:
        if identity is None:
            raise ToolError("the server was started without --identity-jwks-url")
        assertion = _incoming_headers(ctx).get("x-identity-assertion")
        if not assertion:
            raise ToolError("no X-Identity-Assertion header on the request")
        try:
            return await anyio.to_thread.run_sync(lambda: verify_identity_assertion(
                assertion, jwks_url=identity.jwks_url, audience=identity.audience, issuer=identity.issuer
            ))
        except jwt.PyJWTError as exc:
            raise ToolError(f"identity assertion refused: {type(exc).__name__}: {exc}")

    @mcp.tool(name="identity")
    async def identity_claims(ctx: Context) -> dict:
        """Return the verified claims of the request's X-Identity-Assertion."""
        return await verified_identity(ctx)

    @mcp.tool()
    async def whoami(ctx: Context) -> str:
        """Return the upstream subject of the bearer token this request carried (or, with identity
        assertions configured, the verified assertion's subject)."""
        if identity is not None:
            return (await verified_identity(ctx))["sub"]
        if not userinfo_url:
            raise ToolError("the server was started without a userinfo URL")
        authorization = _incoming_headers(ctx).get("authorization")
        if not authorization:
            raise ToolError("no Authorization header on the request")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(userinfo_url, headers={"Authorization": authorization})
        if response.status_code != 200:
            raise ToolError(f"userinfo answered {response.status_code}: {response.text[:200]}")
        return response.json()["sub"]

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return text

    @mcp.tool()
    def echo_auth(ctx: Context) -> str:
        """Return the Authorization header this request carried ("" when none)."""
        return _incoming_headers(ctx).get("authorization", "")

    @mcp.tool()
    def echo_headers(ctx: Context) -> dict[str, str]:
        """Return every HTTP header this request carried."""
        return _incoming_headers(ctx)

    @mcp.tool()
    async def stream_progress(ctx: Context, count: int = 5, delay: float = 0.2) -> str:
        """Send `count` progress notifications `delay` seconds apart, then return "done"."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count, f"step {i}/{count}")
            if i < count:
                await anyio.sleep(delay)
        return "done"

    @mcp.tool()
    async def slow(seconds: float = 1.0) -> str:
        """Sleep, then answer."""
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @mcp.tool()
    def admin_reset() -> str:
        """An administrative tool (tool policies restrict it): records the call, then answers "reset"."""
        TOOL_CALLS.append("admin_reset")
        return "reset"

    return mcp


class GatewayFacingMiddleware:
    """Pure ASGI wrapper (keeps SSE responses streaming): request stats, optional bearer check."""

    def __init__(self, app: ASGIApp, *, require_bearer: str, userinfo_url: str | None) -> None:
        self.app = app
        self.require_bearer = require_bearer
        self.userinfo_url = userinfo_url
        self.stats: dict[str, Any] = {"requests": {}, "unauthorized": 0, "last_headers": {}}
        self._http = httpx.AsyncClient(timeout=10)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/__stats" and scope["method"] == "GET":
            await self._json(send, 200, {**self.stats, "tool_calls": list(TOOL_CALLS)})
            return
        if path.rstrip("/") == MCP_PATH:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            self.stats["requests"][scope["method"]] = self.stats["requests"].get(scope["method"], 0) + 1
            self.stats["last_headers"] = headers
            problem = await self._check_bearer(headers.get("authorization", ""))
            if problem:
                self.stats["unauthorized"] += 1
                await self._json(
                    send,
                    401,
                    {"error": "invalid_token", "error_description": problem},
                    extra=[
                        (b"www-authenticate", f'Bearer error="invalid_token", error_description="{problem}"'.encode())
                    ],
                )
                return
        await self.app(scope, receive, send)

    async def _check_bearer(self, authorization: str) -> str | None:
        if self.require_bearer not in ("1", "userinfo"):
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing bearer token"
        if self.require_bearer == "userinfo":
            if not self.userinfo_url:
                return "server has no userinfo URL to validate tokens"
            response = await self._http.get(self.userinfo_url, headers={"Authorization": authorization})
            if response.status_code != 200:
                return f"upstream userinfo refused the token ({response.status_code})"
        return None

    @staticmethod
    async def _json(send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": payload})


class _ReadyServer(uvicorn.Server):
    """Prints the ready line once the listening socket is being served (after app lifespan startup)."""

    def __init__(self, config: uvicorn.Config, ready_line: dict[str, Any]) -> None:
        super().__init__(config)
        self._ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            sys.stdout.write(json.dumps(self._ready_line) + "\n")
            sys.stdout.flush()


def _exit_when_stdin_closes() -> None:
    """Exit when the parent closes our stdin (or dies): no orphaned test servers."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--userinfo-url", default=os.environ.get("USERINFO_URL"))
    parser.add_argument("--identity-jwks-url", default=os.environ.get("IDENTITY_JWKS_URL"))
    parser.add_argument("--identity-issuer", default=os.environ.get("IDENTITY_ISSUER"))
    parser.add_argument("--stateless", action="store_true", help="stateless streamable HTTP (no Mcp-Session-Id)")
    parser.add_argument("--json-response", action="store_true", help="answer POSTs with JSON instead of SSE")
    parser.add_argument(
        "--allow-any-host",
        action="store_true",
        help="turn off the SDK's DNS-rebinding (Host/Origin) check, on by default for loopback hosts",
    )
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)

    if args.exit_on_stdin_eof:
        _exit_when_stdin_closes()

    # Bind first, so port 0 resolves to the real port before the ready line is built.
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the listener says TCP.
    sock = socket.socket(
        socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    host_for_url = f"[{args.host}]" if ":" in args.host else args.host

    ready = {"ready": True, "url": f"http://{host_for_url}:{port}{MCP_PATH}", "port": port}
    identity = (
        IdentityCheck(jwks_url=args.identity_jwks_url, issuer=args.identity_issuer or "", audience=ready["url"])
        if args.identity_jwks_url else None
    )
    mcp = build_mcp(args.userinfo_url, identity)
    app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=args.stateless,
        json_response=args.json_response,
        host=args.host,
        transport_security=(
            TransportSecuritySettings(enable_dns_rebinding_protection=False) if args.allow_any_host else None
        ),
    )
    wrapped = GatewayFacingMiddleware(
        app, require_bearer=os.environ.get("REQUIRE_BEARER", ""), userinfo_url=args.userinfo_url
    )
    config = uvicorn.Config(
        wrapped,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    _ReadyServer(config, ready).run(sockets=[sock])


if __name__ == "__main__":
    main()
