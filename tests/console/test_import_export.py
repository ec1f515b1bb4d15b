import json

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.db import connection

from oauthproxy.models import McpServer

DOCS = [
    {
        "slug": "crm",
        "name": "CRM",
        "mcp_url": "http://crm.internal/mcp",
        "authorization_endpoint": "https://idp.example.com/authorize",
        "token_endpoint": "https://idp.example.com/token",
        "client_id": "proxy",
        "client_secret": "s3cret-crm",
        "scopes": ["openid", "offline_access"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "extra_authorize_params": {"audience": "https://api.example.com"},
    },
    {
        "slug": "wiki",
        "name": "Wiki",
        "authorization_endpoint": "https://idp.example.com/authorize",
        "token_endpoint": "https://idp.example.com/token",
        "client_id": "public-proxy",
        "token_endpoint_auth_methods_supported": ["none"],
        "use_pkce": False,
    },
]


def run(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def json_file(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text(json.dumps(DOCS, indent=2))
    return path


@pytest.mark.django_db
class TestImport:
    def test_import_creates_then_is_idempotent(self, json_file):
        assert "2 created, 0 changed, 0 unchanged" in run("import_servers", str(json_file))
        crm = McpServer.objects.get(slug="crm")
        assert crm.client_secret == "s3cret-crm"
        assert crm.extra_authorize_params == {"audience": "https://api.example.com"}
        assert McpServer.objects.get(slug="wiki").use_pkce is False
        assert "0 created, 0 changed, 2 unchanged" in run("import_servers", str(json_file))

    def test_import_reports_changed_fields(self, json_file, tmp_path):
        run("import_servers", str(json_file))
        docs = json.loads(json_file.read_text())
        docs[0]["name"] = "CRM v2"
        docs[0]["client_secret"] = "rotated"
        path = tmp_path / "v2.yaml"
        path.write_text(yaml.safe_dump(docs))
        out = run("import_servers", str(path))
        assert "changed crm: name, client_secret" in out
        assert "rotated" not in out
        assert McpServer.objects.get(slug="crm").client_secret == "rotated"

    def test_invalid_entry_names_line_and_field_and_changes_nothing(self, json_file, tmp_path):
        run("import_servers", str(json_file))
        path = tmp_path / "bad.yaml"
        path.write_text(
            "- slug: crm\n"
            "  name: Renamed\n"
            "  authorization_endpoint: https://idp.example.com/authorize\n"
            "  token_endpoint: https://idp.example.com/token\n"
            "  client_id: proxy\n"
            "- slug: Bad Slug\n"
            "  name: x\n"
            "  authorization_endpoint: https://idp.example.com/authorize\n"
            "  token_endpoint: ftp://idp.example.com/token\n"
            "  client_id: proxy\n"
            "  client_secret: s\n"
            "  colour: blue\n"
        )
        with pytest.raises(CommandError) as info:
            run("import_servers", str(path))
        message = str(info.value)
        assert "Nothing was imported" in message
        assert f"{path}:6: entry 2 field 'slug'" in message
        assert f"{path}:9: entry 2 field 'token_endpoint'" in message
        assert f"{path}:12: entry 2 field 'colour': Unknown field" in message
        assert McpServer.objects.get(slug="crm").name == "CRM"  # the valid first entry was not applied

    def test_missing_secret_on_create_is_an_error(self, tmp_path):
        doc = dict(DOCS[0])
        del doc["client_secret"]
        path = tmp_path / "s.json"
        path.write_text(json.dumps([doc]))
        with pytest.raises(CommandError, match="client_secret"):
            run("import_servers", str(path))
        assert not McpServer.objects.exists()

    def test_syntax_errors_have_positions(self, tmp_path):
        bad_json = tmp_path / "x.json"
        bad_json.write_text('[\n  {"slug": "a",\n  }\n]')
        with pytest.raises(CommandError, match=r"x.json:3:3: invalid JSON"):
            run("import_servers", str(bad_json))
        bad_yaml = tmp_path / "x.yaml"
        bad_yaml.write_text("- slug: a\n  name: [unclosed\n")
        with pytest.raises(CommandError, match=r"x.yaml:\d+:\d+: invalid YAML"):
            run("import_servers", str(bad_yaml))

    def test_top_level_must_be_a_list(self, tmp_path):
        path = tmp_path / "x.yaml"
        path.write_text("slug: a\n")
        with pytest.raises(CommandError, match="list of server objects"):
            run("import_servers", str(path))

    def test_missing_file(self, tmp_path):
        with pytest.raises(CommandError, match="Cannot read"):
            run("import_servers", str(tmp_path / "nope.json"))


@pytest.mark.django_db
class TestExport:
    def test_export_never_prints_secrets_and_round_trips(self, json_file, tmp_path):
        run("import_servers", str(json_file))
        exported = run("export_servers")
        assert "s3cret-crm" not in exported
        documents = json.loads(exported)
        assert [d["slug"] for d in documents] == ["crm", "wiki"]
        assert "client_secret" not in documents[0]
        assert documents[0]["scopes"] == ["openid", "offline_access"]

        yaml_out = run("export_servers", "--format", "yaml")
        assert yaml.safe_load(yaml_out) == documents
        path = tmp_path / "exported.yaml"
        path.write_text(yaml_out)
        assert "0 created, 0 changed, 2 unchanged" in run("import_servers", str(path))
        assert McpServer.objects.get(slug="crm").client_secret == "s3cret-crm"

    def test_raw_dump_has_no_secret(self, json_file):
        run("import_servers", str(json_file))
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM oauthproxy_mcpserver")
            assert "s3cret-crm" not in repr(cursor.fetchall())


@pytest.mark.django_db
def test_nul_characters_are_refused_not_a_database_error(tmp_path):
    doc = dict(DOCS[0], extra_authorize_params={"aud\u0000ience": "x"})
    path = tmp_path / "nul.json"
    path.write_text(json.dumps([doc]))
    with pytest.raises(CommandError, match="NUL"):
        run("import_servers", str(path))
    assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_quota_fields_round_trip(json_file, tmp_path):
    docs = json.loads(json_file.read_text())
    docs[0]["client_upstream_rate_limit"] = 30
    path = tmp_path / "q.json"
    path.write_text(json.dumps(docs))
    run("import_servers", str(path))
    exported = json.loads(run("export_servers"))
    assert exported[0]["client_upstream_rate_limit"] == 30


@pytest.mark.django_db
def test_imports_are_audited_without_secrets(json_file):
    from oauthproxy.models import AuditEvent

    run("import_servers", str(json_file))
    events = AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE)
    assert sorted(e.detail["slug"] for e in events) == ["crm", "wiki"]
    assert all(e.message.startswith("import: ") for e in events)
    assert "s3cret-crm" not in repr(list(events.values()))


@pytest.mark.django_db
def test_identity_fields_round_trip_and_are_validated(json_file, tmp_path):
    docs = json.loads(json_file.read_text())
    docs[0].update(identity_assertion=True, forward_upstream_token=False)
    path = tmp_path / "identity.json"
    path.write_text(json.dumps(docs))
    run("import_servers", str(path))
    server = McpServer.objects.get(slug="crm")
    assert server.identity_assertion is True and server.forward_upstream_token is False
    exported = {doc["slug"]: doc for doc in json.loads(run("export_servers"))}
    assert (exported["crm"]["identity_assertion"], exported["crm"]["forward_upstream_token"]) == (True, False)
    assert (exported["wiki"]["identity_assertion"], exported["wiki"]["forward_upstream_token"]) == (False, True)
    docs[0]["identity_assertion"] = "maybe"
    path.write_text(json.dumps(docs))
    with pytest.raises(CommandError, match="identity_assertion"):
        run("import_servers", str(path))
