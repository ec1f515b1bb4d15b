"""FastMCP's OAuthProxy (OIDCProxy) for the comparison runs. Runs in bench/.venv-fastmcp (its own mcp pin).

    bench/.venv-fastmcp/bin/python bench/fastmcp_server.py --mode gateway --config-url IDP/.well-known/... \
        --client-id fastmcp-gw --client-secret S --internal-url http://127.0.0.1:P/mcp

Modes:
    gateway  FastMCP proxying to the internal MCP server (`create_proxy(url, auth=OIDCProxy(...))`): the shape
             that competes with our gateway.
    own      FastMCP serving its own `echo` tool behind OIDCProxy.

Configuration, FastMCP's defaults where they exist, else as favourable to FastMCP as its documentation allows:
- ``--storage disk`` (default): FastMCP's default persistent store, an encrypted file tree under FASTMCP_HOME
  (the bench gives each process a temporary one); ``--storage memory``: its in-memory store (fastest, loses
  every registration and token on restart, so not a deployment option; for reference);
- ``verify_id_token=True``: the IdP issues opaque access tokens, so per request FastMCP checks the OIDC
  ID token's signature against the (cached) JWKS instead of calling the upstream;
- ``forward_resource=False``: the strict upstream answers invalid_target to a resource it does not know;
- consent on (the default), like our proxy.

Prints one JSON line once it serves: {"ready": true, "url": ".../mcp", "base_url": ..., "port": ...}; exits
when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import threading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("gateway", "own"), required=True)
    parser.add_argument("--config-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--internal-url", default="")
    parser.add_argument("--scopes", default="openid profile email offline_access")
    parser.add_argument("--storage", choices=("disk", "memory"), default="disk")
    args = parser.parse_args()

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()

    import uvicorn
    from fastmcp import FastMCP
    from fastmcp.server import create_proxy
    from fastmcp.server.auth.oidc_proxy import OIDCProxy
    from key_value.aio.stores.memory import MemoryStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"

    scopes = args.scopes.split()
    auth = OIDCProxy(
        config_url=args.config_url,
        client_id=args.client_id,
        client_secret=args.client_secret,
        base_url=base_url,
        verify_id_token=True,
        valid_scopes=scopes,
        client_storage=MemoryStore() if args.storage == "memory" else None,
        jwt_signing_key=secrets.token_hex(32),
        forward_resource=False,
        token_endpoint_auth_method="client_secret_basic",
    )
    if args.mode == "own":
        mcp = FastMCP("fastmcp-own", auth=auth)

        @mcp.tool
        def echo(text: str) -> str:
            """Return the text."""
            return text

    else:
        mcp = create_proxy(args.internal_url, name="fastmcp-gateway", auth=auth)

    app = mcp.http_app(path="/mcp")
    ready = {"ready": True, "url": f"{base_url}/mcp", "base_url": base_url, "port": port, "pid": os.getpid()}

    class _ReadyServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                sys.stdout.write(json.dumps(ready) + "\n")
                sys.stdout.flush()

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
    _ReadyServer(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
