"""`make run` itself, as a newcomer runs it: local settings, SQLite, one process, a PORT of its own and
nothing else configured. The official MCP Python SDK client goes from a bare 401 through registration (DCR,
then a client ID metadata document), consent, the upstream login and the gateway; the issuer in the
metadata carries the port (PUBLIC_BASE_URL derived from PORT).

The proxy is started with the Makefile's own `run` target. What differs from a newcomer's shell: the
database file is in a temporary directory (the developer's db.sqlite3 is left alone), and the client ID
metadata document is served on loopback (CIMD_ALLOW_PRIVATE_ADDRESSES), as in every e2e test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    import proxy as proxy_helpers
    from conftest import COMPANY_IDP, SLUG, USER, server_document, upstream_client
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e import proxy as proxy_helpers
    from tests.e2e.conftest import COMPANY_IDP, SLUG, USER, server_document, upstream_client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]

READY_TIMEOUT = 300.0  # `make run` may install the package first (a changed pyproject.toml)


class MakeRun:
    """`make run` in the repository, in a process group of its own (make, then migrate, then uvicorn)."""

    def __init__(self, *, port: int, directory: Path) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {name: os.environ[name] for name in proxy_helpers.INHERITED_ENV if name in os.environ}
        self.env.update(
            PORT=str(port),
            DATABASE_URL=f"sqlite:///{directory / 'db.sqlite3'}",
            ADMIN_PASSWORD="make-run-admin",
            CIMD_ALLOW_PRIVATE_ADDRESSES="true",
            PYTHONUNBUFFERED="1",
        )
        self.log_path = directory / "make-run.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            ["make", "--no-print-directory", "run"], cwd=proxy_helpers.REPO_DIR, env=self.env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise harness.HarnessError(f"make run exited with {self._process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise harness.HarnessError(f"make run did not serve within {READY_TIMEOUT:.0f}s:\n{self.log_text()}")

    def manage(self, *args: str) -> str:
        """`manage.py ARGS` with the settings `make run` uses (its DJANGO_SETTINGS_MODULE, database, URL)."""
        env = {**self.env, "DJANGO_SETTINGS_MODULE": "proxy_site.settings.local", "PUBLIC_BASE_URL": self.base_url}
        result = subprocess.run(
            [str(proxy_helpers.REPO_DIR / ".venv" / "bin" / "python"), str(proxy_helpers.MANAGE_PY), *args],
            cwd=proxy_helpers.REPO_DIR, env=env, capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise harness.HarnessError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20_000:]

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)  # make and the uvicorn it started
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        self._log.close()


def _free_port() -> int:
    listener = proxy_helpers.listen_loopback()
    try:
        return listener.getsockname()[1]
    finally:
        listener.close()


@pytest.fixture
def make_run_stack() -> Iterator[tuple[MakeRun, harness.Upstream]]:
    port = _free_port()
    while port == 8000:  # the point is a port other than the default
        port = _free_port()
    callback = f"http://127.0.0.1:{port}/oauth/{SLUG}/callback"
    with tempfile.TemporaryDirectory(prefix="e2e-make-run-") as directory, \
            harness.start_upstream({**COMPANY_IDP, "clients": [upstream_client("client_secret_basic", [callback])]}) \
            as idp, \
            harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "userinfo"}) as mcp:
        run = MakeRun(port=port, directory=Path(directory))
        try:
            run.wait_ready()
            documents = Path(directory) / "servers.json"
            documents.write_text(json.dumps([server_document(idp, mcp)]))
            run.manage("import_servers", str(documents))
            yield run, idp
        finally:
            run.stop()


def test_make_run_serves_every_flow_on_sqlite_at_its_own_port(make_run_stack):
    run, _idp = make_run_stack
    gateway = f"{run.base_url}/mcp/{SLUG}"

    bare = httpx.post(gateway, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, timeout=10)
    assert bare.status_code == 401
    assert f"{run.base_url}/.well-known/oauth-protected-resource/mcp/{SLUG}" in bare.headers["WWW-Authenticate"]
    metadata = httpx.get(f"{run.base_url}/.well-known/oauth-authorization-server/oauth/{SLUG}", timeout=10).json()
    assert metadata["issuer"] == f"http://127.0.0.1:{run.port}/oauth/{SLUG}"  # PUBLIC_BASE_URL from PORT

    # Dynamic Client Registration
    registered = harness.McpOAuthClient(gateway, username=USER)
    try:
        assert anyio.run(_whoami, registered) == USER
        assert [event.status for event in registered.requests(path_suffix="/register")] == [201]
        assert registered.authorizations and registered.authorizations[0].outcome.consent_pages
    finally:
        registered.close()

    # A client ID metadata document instead
    path = "/clients/make-run-client.json"
    documents: dict[str, dict] = {}
    with harness.start_document_server(documents) as host:
        client = harness.McpOAuthClient(gateway, username=USER, client_metadata_url=host.url + path, mode="auto")
        documents[path] = {
            "client_id": host.url + path,
            "client_name": "make run CIMD client",
            "redirect_uris": [client.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        try:
            assert anyio.run(_whoami, client) == USER
            assert ("GET", path) in host.requests and not client.requests(path_suffix="/register")
        finally:
            client.close()
    assert "Traceback" not in run.log_text()


async def _whoami(client: harness.McpOAuthClient) -> str:
    return harness.tool_text(await client.call_tool("whoami"))
