import base64
import os
from unittest import mock

import pytest
from django.core.management import call_command
from django.db import connection

from oauthproxy.core import crypto
from oauthproxy.models import McpServer

SECRET = "upstream-secret-value-123"


def raw_secret_column(server) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT client_secret FROM oauthproxy_mcpserver WHERE id = %s", [db_pk(server)])
        return cursor.fetchone()[0]


def db_pk(server):
    """The primary key as the database stores it (a UUID is text on SQLite)."""
    return McpServer._meta.pk.get_db_prep_value(server.pk, connection)


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@pytest.mark.django_db
class TestEncryptedSecret:
    def test_database_holds_ciphertext_only(self, server):
        raw = raw_secret_column(server)
        assert SECRET not in raw
        assert raw.startswith("enc:v1:")
        assert McpServer.objects.get(pk=server.pk).client_secret == SECRET

    def test_values_and_exports_see_no_plaintext(self, server):
        assert SECRET not in str(list(McpServer.objects.values("client_secret")))

    def test_ciphertext_moved_to_another_row_does_not_decrypt(self, server, server_factory):
        other = server_factory(slug="other", client_secret="another-secret")
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE oauthproxy_mcpserver SET client_secret = %s WHERE id = %s",
                [raw_secret_column(server), db_pk(other)],
            )
        with pytest.raises(crypto.DecryptionError):
            McpServer.objects.get(pk=other.pk).client_secret  # noqa: B018

    def test_tampered_ciphertext_is_refused(self, server):
        raw = raw_secret_column(server)
        tampered = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
        McpServer.objects.filter(pk=server.pk).update(client_secret=tampered)
        with pytest.raises(crypto.DecryptionError):
            McpServer.objects.get(pk=server.pk).client_secret  # noqa: B018

    def test_plaintext_cannot_be_written_around_save(self, server):
        with pytest.raises(ValueError):
            McpServer.objects.filter(pk=server.pk).update(client_secret="plain")

    def test_unknown_key_is_reported(self, server, settings):
        settings.PROXY_ENCRYPTION_KEYS = [new_key()]
        with pytest.raises(crypto.DecryptionError, match="no configured key"):
            McpServer.objects.get(pk=server.pk).client_secret  # noqa: B018


@pytest.mark.django_db
def test_rotation_re_encrypts_under_newest_key(server, settings, capsys):
    old_key_id = crypto.key_id_of(raw_secret_column(server))
    settings.PROXY_ENCRYPTION_KEYS = [new_key(), *settings.PROXY_ENCRYPTION_KEYS]
    call_command("rotate_encryption_keys")
    rotated = raw_secret_column(server)
    assert crypto.key_id_of(rotated) == crypto.current_key_id() != old_key_id
    assert "re-encrypted 1 row" in capsys.readouterr().out
    # The old key can now be dropped.
    settings.PROXY_ENCRYPTION_KEYS = settings.PROXY_ENCRYPTION_KEYS[:1]
    assert McpServer.objects.get(pk=server.pk).client_secret == SECRET
    # Running it again changes nothing.
    call_command("rotate_encryption_keys")
    assert raw_secret_column(server) == rotated


@pytest.mark.postgres  # concurrent writers: row locks
@pytest.mark.django_db(transaction=True)
def test_rotation_keeps_an_upstream_refresh_made_during_the_run(server, settings, upstream):
    """Issue 13, finding 6: the command used to read rows without a lock and write them later, so an
    upstream refresh token rotated meanwhile was overwritten with the old one and the session died."""
    import threading

    from django.db import connections

    from oauthproxy.grants.sessions import upstream_session_ensure_fresh
    from oauthproxy.models import UpstreamSession
    from tests.conftest import UPSTREAM
    from tests.factories import make_client, make_upstream_session

    session = make_upstream_session(server, make_client(server), access_token="at-before", refresh_token="rt-before")
    upstream.add(upstream.POST, f"{UPSTREAM}/token", json={
        "access_token": "at-after", "refresh_token": "rt-after", "token_type": "Bearer", "expires_in": 3600,
    })
    settings.PROXY_ENCRYPTION_KEYS = [new_key(), *settings.PROXY_ENCRYPTION_KEYS]

    def refresh_elsewhere():  # what the gateway does when the internal server refuses the upstream token
        try:
            row = UpstreamSession.objects.get(pk=session.pk)
            upstream_session_ensure_fresh(session=row, rejected_access_token="at-before")
        finally:
            connections.close_all()

    original_decrypt = crypto.decrypt
    refresher = threading.Thread(target=refresh_elsewhere)

    def decrypt_during_the_run(ciphertext, *, context):
        # The moment the command holds the session's values in hand: the upstream refresh happens now.
        if context.startswith(UpstreamSession._meta.db_table) and not refresher.is_alive() and not refresher.ident:
            refresher.start()
            refresher.join(timeout=2)  # with the row locked it waits for the command instead
        return original_decrypt(ciphertext, context=context)

    crypto_decrypt = mock.patch.object(crypto, "decrypt", decrypt_during_the_run)
    with crypto_decrypt:
        call_command("rotate_encryption_keys")
    refresher.join(timeout=10)
    assert refresher.ident and not refresher.is_alive()
    settings.PROXY_ENCRYPTION_KEYS = settings.PROXY_ENCRYPTION_KEYS[:1]  # the old key is gone
    row = UpstreamSession.objects.get(pk=session.pk)
    assert row.refresh_token == "rt-after"  # the rotated refresh token survived
    assert row.access_token == "at-after"
