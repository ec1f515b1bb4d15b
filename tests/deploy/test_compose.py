"""docker-compose.yml as written, without a Docker daemon: the file validates with Debian's
`docker-compose config`, and the app container's command runs on this host with the compose environment
(production settings, strict hosts, PostgreSQL) and passes its own health check command."""

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# Only the variables the README names for a deployment.
README_VARIABLES = {
    "PUBLIC_BASE_URL": "https://proxy.example.com",
    "SECRET_KEY": "compose-test-secret-key-0123456789abcdef",
    "PROXY_ENCRYPTION_KEYS": base64.urlsafe_b64encode(b"k" * 32).decode(),
}


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: $$, ${NAME}, ${NAME:-default}, ${NAME:?error}."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group("name"), match.group("op"), match.group("arg")
        current = variables.get(name, "")
        if operator == ":-":
            return current or argument
        if operator == ":?" and not current:
            raise ValueError(f"{name}: {argument}")
        return current

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}", substitute, value)


def service(name: str, variables: dict[str, str]) -> dict:
    """A service of docker-compose.yml with its anchors merged and its variables substituted."""
    spec = yaml.safe_load(COMPOSE.read_text())["services"][name]

    def resolved(node):
        if isinstance(node, str):
            return interpolate(node, variables)
        if isinstance(node, list):
            return [resolved(item) for item in node]
        if isinstance(node, dict):
            return {key: resolved(item) for key, item in node.items()}
        return node

    return resolved(spec)


def test_compose_file_validates_with_docker_compose():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed here (Debian package `docker-compose`; .ci/run installs it)")
    environment = {"PATH": os.environ["PATH"], **README_VARIABLES}
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "--quiet"], env=environment, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "--quiet"], env={"PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode != 0 and "PUBLIC_BASE_URL" in missing.stderr  # says what to set


def test_compose_trusts_forwarded_headers_only_from_the_proxy_and_publishes_on_loopback():
    app = service("app", README_VARIABLES)
    assert app["environment"]["FORWARDED_ALLOW_IPS"] not in ("*", "")
    assert "forwarded-allow-ips" not in " ".join(app["command"])
    assert all(port.startswith("127.0.0.1:") for port in app["ports"])
    assert app["environment"]["ALLOW_HTTP_BASE_URL"] == "false"  # passed through, off unless set
    assert service("app", {**README_VARIABLES, "ALLOW_HTTP_BASE_URL": "true"})["environment"][
        "ALLOW_HTTP_BASE_URL"] == "true"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "migrate" not in " ".join(app["command"])  # migrations run once, in their own service
    assert "cleanup_expired" in " ".join(service("cleanup", README_VARIABLES)["command"])
    assert app["environment"]["PROMETHEUS_MULTIPROC_DIR"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def compose_database():
    """A fresh PostgreSQL database for the compose environment's DATABASE_URL (the `db` service here)."""
    psycopg = pytest.importorskip("psycopg")
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/oauthproxy")
    if not base.startswith("postgres"):
        pytest.skip("the compose stack runs on PostgreSQL; set DATABASE_URL to a PostgreSQL server")
    name = f"oauthproxy_compose_{os.getpid()}"
    admin_url = urlsplit(base)._replace(path="/postgres").geturl()
    try:
        connection = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    with connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    yield urlsplit(base)._replace(path=f"/{name}").geturl()
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_app_command_serves_with_the_compose_environment_and_passes_its_health_check(compose_database, tmp_path):
    migrate, app = service("migrate", README_VARIABLES), service("app", README_VARIABLES)
    environment = {
        **{key: str(value) for key, value in app["environment"].items()},
        # What differs on this host: the `db` and `redis` service names, the port and the metrics tmpfs.
        "DATABASE_URL": compose_database,
        "REDIS_URL": "",
        "PORT": str(free_port()),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
        "DJANGO_SETTINGS_MODULE": "proxy_site.settings.production",  # the image's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    assert environment["ALLOWED_HOSTS"] == ""  # strict: the production default, PUBLIC_BASE_URL's host
    subprocess.run(migrate["command"], cwd=ROOT, env=environment, check=True, capture_output=True, timeout=300)
    check = app["healthcheck"]["test"][1:]  # after "CMD"
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_1.db").write_bytes(b"stale")
    process = subprocess.Popen(app["command"], cwd=ROOT, env=environment, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            result = subprocess.run(check, cwd=ROOT, env=environment, capture_output=True, timeout=30)
            if result.returncode == 0:
                break
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, result.stderr.decode()
            time.sleep(1)
        # The hosts really are strict: a request for another host is refused.
        wrong_host = subprocess.run(
            [sys.executable, "-c", "import urllib.request as u,sys\n"
             f"r=u.Request('http://127.0.0.1:{environment['PORT']}/readyz',headers={{'Host':'evil.example'}})\n"
             "try: print(u.urlopen(r,timeout=3).status)\nexcept Exception as e: print(getattr(e,'code',e))\n"],
            capture_output=True, text=True, timeout=30,
        )
        assert wrong_host.stdout.strip() == "400"
        assert not (tmp_path / "metrics" / "counter_1.db").exists()  # an earlier start's metrics are gone
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
